import math

import numpy as np
import pytest
import torch

from tumorseg.config import TrainConfig
from tumorseg.losses import create_loss
from tumorseg.metrics import SegmentationMeter, confusion_counts, dice_per_image, iou_per_image, pooled_scores

BIG = 20.0  # a logit this large is probability 1 - 2e-9


def logits_from(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(mask, BIG, -BIG).astype(np.float32))[None, None]


def test_counts_dice_iou_by_hand():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    true = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).bool()
    counts = confusion_counts(pred, true).numpy()
    # image 0: TP 1 FP 1 FN 1; image 1: empty/empty; image 2: FP only; image 3: FN only
    np.testing.assert_array_equal(counts, [[1, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(dice_per_image(counts), [2 / 4, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(iou_per_image(counts), [1 / 3, 1.0, 0.0, 0.0])
    pooled = pooled_scores(counts)  # ΣTP 1, ΣFP 2, ΣFN 2
    assert pooled == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 2 / 6})


def test_pooled_f1_is_harmonic_mean_of_pooled_precision_recall():
    counts = np.array([[10, 5, 0], [3, 40, 7], [0, 0, 9]])
    s = pooled_scores(counts)
    assert s["f1"] == pytest.approx(2 * s["precision"] * s["recall"] / (s["precision"] + s["recall"]))
    assert s["precision"] == pytest.approx(13 / 58) and s["recall"] == pytest.approx(13 / 29)


def test_meter_thresholds_probabilities_and_soft_dice_loss():
    true = np.zeros((4, 4), bool)
    true[:2, :2] = True  # 4 true pixels
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 predicted: TP 4 FP 2
    meter = SegmentationMeter(threshold=0.5)
    for update in (meter.update, meter.update_soft):  # same resolution here
        update(logits_from(pred), torch.from_numpy(true)[None, None])
        update(logits_from(np.zeros((4, 4), bool)), torch.zeros(1, 1, 4, 4))  # empty/empty
    m = meter.compute()
    assert m["dice"] == pytest.approx((8 / 10 + 1.0) / 2)
    assert m["iou"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert m["precision"] == pytest.approx(4 / 6) and m["recall"] == pytest.approx(1.0)
    assert m["dice_loss"] == pytest.approx(1 - 8 / 10, abs=1e-6)


def test_meter_threshold_is_strict_and_applies_to_probabilities():
    meter = SegmentationMeter(threshold=0.5)
    meter.update(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))  # p = 0.5 exactly: not tumour
    assert meter.compute()["recall"] == 0.0
    meter = SegmentationMeter(threshold=0.8)  # logit 1.2 -> p 0.77: below; logit 1.5 -> p 0.82: above
    meter.update(torch.tensor([1.2, 1.5]).view(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert meter.compute()["recall"] == 0.5


# ----------------------------------------------------------------------------- losses


def soft_dice_loss(p, t):
    return 1 - 2 * (p * t).sum() / (p.sum() + t.sum())


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    return logits, target


def test_dice_loss_value(batch):
    logits, target = batch
    got = create_loss(TrainConfig(loss_type="dice"))(logits, target)
    p = torch.sigmoid(logits)
    assert got.item() == pytest.approx(soft_dice_loss(p, target).item(), abs=1e-5)


def test_dice_bce_weights(batch):
    logits, target = batch
    got = create_loss(TrainConfig(loss_type="dice_bce", dice_weight=0.75, bce_weight=1.25))(logits, target)
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert got.item() == pytest.approx(0.75 * soft_dice_loss(p, target).item() + 1.25 * bce.item(), abs=1e-5)


def test_dice_focal_gamma(batch):
    logits, target = batch
    cfg = TrainConfig(loss_type="dice_focal", dice_weight=0.5, focal_weight=2.0, focal_gamma=2.0)
    got = create_loss(cfg)(logits, target)
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0, p, 1 - p)
    focal = (-(1 - pt) ** 2 * torch.log(pt)).mean()  # smp's FocalLoss: alpha None, mean reduction
    assert got.item() == pytest.approx(0.5 * soft_dice_loss(p, target).item() + 2.0 * focal.item(), rel=1e-4)


def test_perfect_prediction_has_near_zero_dice_loss():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    loss = create_loss(TrainConfig(loss_type="dice"))(torch.where(target > 0, BIG, -BIG), target)
    assert loss.item() < 1e-3 and not math.isnan(loss.item())


def test_metrics_agree_with_smp_metrics_on_random_masks():
    import segmentation_models_pytorch.metrics as smp_metrics

    gen = torch.Generator().manual_seed(0)
    density = torch.rand(16, 1, 1, 1, generator=gen)
    pred = torch.rand(16, 1, 24, 40, generator=gen) < density
    true = torch.rand(16, 1, 24, 40, generator=gen) < density.flip(0)
    pred[0], true[0] = False, False  # empty / empty
    true[1] = False  # false positives only
    pred[2] = False  # missed tumour
    tp, fp, fn, tn = smp_metrics.get_stats(pred.long(), true.long(), mode="binary")
    counts = confusion_counts(pred, true).numpy()
    np.testing.assert_array_equal(counts, torch.cat([tp, fp, fn], 1).numpy())

    imagewise = dict(reduction="micro-imagewise", zero_division=1.0)  # per image, then the mean; empty/empty = 1
    smp_dice = smp_metrics.f1_score(tp, fp, fn, tn, **imagewise).item()
    assert dice_per_image(counts).mean() == pytest.approx(smp_dice, abs=1e-6)
    assert iou_per_image(counts).mean() == pytest.approx(smp_metrics.iou_score(tp, fp, fn, tn, **imagewise).item(), abs=1e-6)
    pooled = pooled_scores(counts)
    micro = dict(reduction="micro", zero_division=0.0)  # counts pooled over the split first
    for name, smp_fn in (("precision", smp_metrics.precision), ("recall", smp_metrics.recall), ("f1", smp_metrics.f1_score)):
        assert pooled[name] == pytest.approx(smp_fn(tp, fp, fn, tn, **micro).item(), abs=1e-6), name

    meter = SegmentationMeter(threshold=0.5)  # the same through the meter, from logits
    meter.update(torch.where(pred, BIG, -BIG), true)
    m = meter.compute()
    assert m["dice"] == pytest.approx(smp_dice, abs=1e-6)
    assert m["f1"] == pytest.approx(smp_metrics.f1_score(tp, fp, fn, tn, **micro).item(), abs=1e-6)

    # where smp differs: nothing predicted in the whole split (pooled 0/0) is nan in smp 0.6's "micro"
    # (zero_division is not applied there); ours is 0 by definition (tumorseg.metrics)
    assert pooled_scores(np.array([[0, 0, 5]])) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
