"""One threshold and one evaluation precision for validation, test, predict and the overlays."""

import numpy as np
import pytest
import torch
from PIL import Image

from tumorseg.config import TrainConfig
from tumorseg.data import Split, load_dataset
from tumorseg.engine import evaluate, train
from tumorseg.metrics import SegmentationMeter
from tumorseg.predict import predict_file
from tumorseg.train import write_run_outputs
from tumorseg.visualize import PRED_RGB, outline, prediction_tiles

FAST = dict(resize_px=64, batch_size=8, lr=5e-3, warmup_epochs=0, encoder_weights="none", num_workers=0)


class FixedLogits(torch.nn.Module):
    """A "model" whose output is a hand-made logit map, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.encoder = torch.nn.Conv2d(1, 1, 1)  # what predict reads the input channel count from (1)

    def forward(self, x):
        return self.logits.expand(len(x), -1, -1, -1) + self.anchor


def hand_made_logits():
    """Background p 0.007; a block at p 0.73 (tumour at threshold 0.5, not at 0.8); a block at p 0.88."""
    logits = torch.full((1, 1, 64, 64), -5.0)
    logits[..., 10:30, 10:30] = 1.0
    logits[..., 36:56, 36:56] = 2.0
    expected = np.zeros((64, 64), np.uint8)
    expected[36:56, 36:56] = 1
    return logits, expected


def test_threshold_is_the_configured_probability_everywhere(tmp_path):
    cfg = TrainConfig(resize_px=64, threshold=0.8, encoder_weights="none")
    logits, expected = hand_made_logits()
    model = FixedLogits(logits)

    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(tmp_path / "scan.png")
    np.testing.assert_array_equal(predict_file(model, cfg, tmp_path / "scan.png"), expected)

    split = Split("test", np.zeros((1, 64, 64), np.uint8), np.zeros((1, 64, 64), np.uint8),
                  np.packbits(expected[None], axis=-1), (64, 64), ("scan.png",))
    tile = np.asarray(prediction_tiles(model, split, cfg, [0], [""])[0])  # 3x nearest upscale to 192 px
    red = np.all(tile == PRED_RGB, axis=-1)
    np.testing.assert_array_equal(red, np.kron(outline(expected), np.ones((3, 3), bool)))

    meter = SegmentationMeter(threshold=cfg.threshold)
    meter.update(logits, torch.from_numpy(expected)[None, None])
    np.testing.assert_array_equal(meter.per_image_counts, [[expected.sum(), 0, 0]])
    metrics, counts = evaluate(model, split, cfg)  # the validation/test path, native masks = expected
    np.testing.assert_array_equal(counts, [[expected.sum(), 0, 0]])
    assert metrics["dice"] == metrics["precision"] == metrics["recall"] == 1.0


@pytest.fixture(scope="module")
def data64(synthetic_dir, session_tmp):
    return load_dataset(synthetic_dir, 64, cache_dir=session_tmp / "cache")


def test_validation_metrics_equal_the_test_path_on_the_same_split(data64, synthetic_dir, tmp_path, monkeypatch):
    from tumorseg import inference

    # bf16 autocast in training wherever the device has it; force it on so the test means the same everywhere
    monkeypatch.setattr(inference, "bf16_supported", lambda device: True)
    cfg = TrainConfig(epochs=1, precision="auto", **{**FAST, "lr": 1e-3})  # predicts something after 1 epoch
    data = {**data64, "test": data64["valid"]}
    result = train(cfg, data, log=None)
    metrics, _ = write_run_outputs(tmp_path, result, cfg, data["test"], synthetic_dir)
    assert metrics["test"] == {k: v for k, v in metrics["valid"].items() if k != "loss"}
