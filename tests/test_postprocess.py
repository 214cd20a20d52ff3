"""Post-processing and ensembles on hand-made probability maps: exact pixels, the greedy selection
on validation (each step kept when it helps, rejected when it does not), the box-label check, and
the mean of probabilities (not of logits) with flip TTA flipped back."""

import math

import numpy as np
import pytest
import torch

from tumorseg.config import TrainConfig
from tumorseg.inference import predict_probabilities
from tumorseg.postprocess import (
    PostProcess,
    apply_postprocess,
    labels_are_boxes,
    load_postprocess,
    min_component_grid,
    save_postprocess,
    select_postprocess,
)

# ----------------------------------------------------------------------------- apply_postprocess


def hand_made_map() -> np.ndarray:
    """One 12 x 12 map: an L (16 px at threshold 0.6; its notch at 0.55 makes it a 4 x 5 box at 0.5),
    a 3 x 3 block at 0.7, two diagonal pixels at 0.8 (one 8-connected component) and a pixel exactly at 0.5."""
    p = np.zeros((1, 12, 12), np.float32)
    p[0, 2:6, 2:7] = 0.9
    p[0, 2:4, 5:7] = 0.55
    p[0, 8:11, 1:4] = 0.7
    p[0, 9, 9] = p[0, 10, 10] = 0.8
    p[0, 0, 11] = 0.5
    return p


def box(rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((12, 12), np.uint8)
    m[rows, cols] = 1
    return m


L_SHAPE = box(slice(2, 6), slice(2, 7)) - box(slice(2, 4), slice(5, 7))
BLOCK = box(slice(8, 11), slice(1, 4))
DIAGONAL = box(slice(9, 10), slice(9, 10)) + box(slice(10, 11), slice(10, 11))


def test_apply_postprocess_gives_exact_pixels():
    probs = hand_made_map()
    at_05 = apply_postprocess(probs, PostProcess(threshold=0.5))[0]
    assert at_05.dtype == np.uint8
    np.testing.assert_array_equal(at_05, box(slice(2, 6), slice(2, 7)) + BLOCK + DIAGONAL)  # 0.5 itself is not above
    np.testing.assert_array_equal(apply_postprocess(probs, PostProcess(threshold=0.6))[0], L_SHAPE + BLOCK + DIAGONAL)
    # components below 3 px go; the diagonal pair is one 2-px component (8-connected), kept at 2
    np.testing.assert_array_equal(apply_postprocess(probs, PostProcess(threshold=0.6, min_component_px=3))[0], L_SHAPE + BLOCK)
    np.testing.assert_array_equal(apply_postprocess(probs, PostProcess(threshold=0.6, min_component_px=2))[0],
                                  L_SHAPE + BLOCK + DIAGONAL)
    np.testing.assert_array_equal(apply_postprocess(probs, PostProcess(threshold=0.6, keep_largest=True))[0], L_SHAPE)
    filled = box(slice(2, 6), slice(2, 7)) + BLOCK + box(slice(9, 11), slice(9, 11))  # each component to its box
    np.testing.assert_array_equal(apply_postprocess(probs, PostProcess(threshold=0.6, fill_boxes=True))[0], filled)
    # larger than every component: nothing is left, and keep-largest keeps nothing
    everything = PostProcess(threshold=0.6, min_component_px=17, keep_largest=True, fill_boxes=True)
    assert apply_postprocess(probs, everything).sum() == 0
    chain = PostProcess(threshold=0.6, min_component_px=3, keep_largest=True, fill_boxes=True)
    np.testing.assert_array_equal(apply_postprocess(probs, chain)[0], box(slice(2, 6), slice(2, 7)))


def test_postprocess_file_round_trip_and_refusals(tmp_path):
    pp = PostProcess(threshold=0.4, flip_tta=True, min_component_px=12, keep_largest=True, fill_boxes=False)
    save_postprocess(tmp_path / "postprocess.json", pp, [{"step": "none", "value": None, "val_dice": 0.5, "kept": True}])
    assert load_postprocess(tmp_path / "postprocess.json") == pp
    assert PostProcess.from_dict(pp.to_dict()) == pp
    (tmp_path / "other.json").write_text('{"postprocess": {}}')
    from tumorseg.errors import UserError

    with pytest.raises(UserError, match="not a tumorseg post-processing file"):
        load_postprocess(tmp_path / "other.json")


# ----------------------------------------------------------------------------- the box-label check


def test_labels_are_boxes_when_the_components_are_filled_rectangles():
    rectangles = [box(slice(1, 4), slice(2, 9)), box(slice(0, 2), slice(0, 2)) + box(slice(6, 9), slice(6, 12))]
    assert labels_are_boxes(rectangles + [np.zeros((12, 12), np.uint8)])  # empty masks have no components
    assert not labels_are_boxes(rectangles + [L_SHAPE])  # 1 of 4 components is not a box: 75 % < 90 %
    assert labels_are_boxes(rectangles * 4 + [L_SHAPE])  # 12 of 13 (92 %): one merged pair of boxes is tolerated
    assert not labels_are_boxes([np.zeros((12, 12), np.uint8)])  # no components at all: not boxes


# ----------------------------------------------------------------------------- selection on validation

R = (slice(4, 12), slice(4, 12))  # the true box of every image with a tumour (64 px of 20 x 20)
NOTCH = (slice(4, 7), slice(9, 12))  # 9 px of R the model never finds: an L of 55 px is predicted


def five_images():
    """Validation maps (20 x 20) where every step of the pipeline helps, one image per step:

    - T: R minus its notch at 0.45: found at threshold 0.4, not 0.5; fill-boxes completes it
    - F: R at 0.25 without, 0.45 with flip TTA: found only with flip TTA
    - M: no tumour, a 3-px speck at 0.9: only a minimum component size (4 px, the grid's largest) removes it
    - L: R at 0.9 plus a 6-px false blob at 0.9 (above every N) and a stripe at 0.35 (so 0.3 is worse than 0.4)
    - B: R minus its notch at 0.9: fill-boxes completes it
    """
    plain = np.zeros((5, 20, 20), np.float32)
    truth = np.zeros((5, 20, 20), np.uint8)
    for i in (0, 1, 3, 4):
        truth[i][R] = 1
    plain[0][R] = 0.45
    plain[1][R] = 0.25
    plain[2, 1, 1:4] = 0.9
    plain[3][R] = 0.9
    plain[3, 15:17, 0:3] = 0.9
    plain[3, 19, :] = 0.35
    plain[4][R] = 0.9
    for i in (0, 4):
        plain[i][NOTCH] = 0.2
    flipped = plain.copy()
    flipped[1][R] = 0.45
    return plain, flipped, truth


def test_min_component_grid_is_a_share_of_the_image_area():
    assert min_component_grid((20, 20)) == [1, 2, 4]
    assert min_component_grid((640, 640)) == [205, 410, 819, 2048, 4096]


def test_selection_keeps_every_step_that_helps():
    plain, flipped, truth = five_images()
    pp, table = select_postprocess(plain, flipped, truth, labels_are_boxes=True, margin=0.002)
    assert pp == PostProcess(threshold=0.4, flip_tta=True, min_component_px=4, keep_largest=True, fill_boxes=True)
    kept = [(row["step"], row["value"]) for row in table if row["kept"]]
    assert kept == [("none", None), ("threshold", 0.4), ("flip_tta", True), ("min_component_px", 4),
                    ("keep_largest", True), ("fill_boxes", True)]
    dice = {(row["step"], row["value"]): row["val_dice"] for row in table}
    l_dice = 2 * 55 / (55 + 64)  # an L of 55 px against the 64-px box
    assert dice[("none", None)] == pytest.approx((0 + 0 + 0 + 128 / 134 + l_dice) / 5)
    assert dice[("threshold", 0.3)] < dice[("threshold", 0.4)]  # the stripe at 0.35
    assert dice[("fill_boxes", True)] == pytest.approx(1.0)  # every image right in the end


def test_selection_rejects_steps_that_do_not_help():
    # two true boxes per image: keep-largest would drop one; flip TTA loses the tumour; every
    # threshold and N gives the same masks: nothing beats the plain pipeline
    plain = np.zeros((2, 20, 20), np.float32)
    truth = np.zeros((2, 20, 20), np.uint8)
    for i in range(2):
        truth[i, 2:6, 2:6] = truth[i, 10:13, 10:13] = 1
        plain[i][truth[i] == 1] = 0.9
    flipped = np.full_like(plain, 0.1)
    pp, table = select_postprocess(plain, flipped, truth, labels_are_boxes=False, margin=0.002)
    assert pp == PostProcess()
    assert [row["step"] for row in table if row["kept"]] == ["none"]
    assert "fill_boxes" not in {row["step"] for row in table}  # the labels are not boxes: never tried
    dice = {(row["step"], row["value"]): row["val_dice"] for row in table}
    assert dice[("keep_largest", True)] == pytest.approx(2 * 16 / (16 + 25))
    assert dice[("flip_tta", True)] == 0.0


def test_selection_rejects_gains_within_the_margin():
    plain, flipped, truth = five_images()
    # every single step gains less than 0.25 of mean Dice here (at most one image in five)
    pp, table = select_postprocess(plain, flipped, truth, labels_are_boxes=True, margin=0.25)
    assert pp == PostProcess()
    assert [row["step"] for row in table if row["kept"]] == ["none"]


# ----------------------------------------------------------------------------- ensembles and flip TTA

CFG = TrainConfig(resize_px=8, precision="fp32", channels_last=False, encoder_weights="none", eval_batch_size=3)


class FixedLogits(torch.nn.Module):
    """A "model" whose output is a hand-made logit map, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits.expand(len(x), -1, -1, -1) + self.anchor


class EchoInput(torch.nn.Module):
    """A "model" whose logits are its (normalised) input: flipping in and back out changes nothing."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, :1] * 4 + self.anchor


def test_ensemble_is_the_mean_of_probabilities_not_of_logits():
    images = np.zeros((5, 8, 8), np.uint8)
    members = [FixedLogits(torch.zeros(1, 1, 8, 8)), FixedLogits(torch.full((1, 1, 8, 8), math.log(9.0)))]
    probs = predict_probabilities(members, images, CFG, native_hw=(12, 16))
    assert probs.shape == (5, 12, 16) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, 0.7, atol=1e-6)  # (0.5 + 0.9) / 2; the mean logit would give 0.75
    np.testing.assert_allclose(predict_probabilities(members[1:], images, CFG, (12, 16)), 0.9, atol=1e-6)


def test_flip_tta_flips_the_input_and_flips_the_output_back():
    ramp = torch.arange(8, dtype=torch.float32).expand(1, 1, 8, 8) - 3.5  # logits rising left to right
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8)
    fixed = predict_probabilities([FixedLogits(ramp)], images, CFG, None, flip_tta=True)
    sig = 1 / (1 + np.exp(-ramp.numpy()[0, 0]))
    np.testing.assert_allclose(fixed[0], (sig + sig[:, ::-1]) / 2, atol=1e-6)  # the map and its mirror, averaged
    echo = [EchoInput()]
    np.testing.assert_allclose(predict_probabilities(echo, images, CFG, None, flip_tta=True),
                               predict_probabilities(echo, images, CFG, None), atol=1e-6)
