import json

import pandas as pd
import pytest
import torch

from conftest import run_cli
from tumorseg.config import ConfigError, TrainConfig
from tumorseg.data import load_dataset
from tumorseg.metrics import SegmentationMeter
from tumorseg.checkpoint import load_model
from tumorseg.engine import evaluate, train
from tumorseg.inference import predict_logits
from tumorseg.schedule import WarmupThenPlateau

FAST = dict(resize_px=64, batch_size=8, lr=5e-3, warmup_epochs=0, encoder_weights="none", num_workers=0)


@pytest.fixture(scope="module")
def data64(synthetic_dir, session_tmp):
    return load_dataset(synthetic_dir, 64, cache_dir=session_tmp / "cache")


def lr_sequence(cfg, steps_per_epoch, val_losses):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=cfg.lr)
    schedule = WarmupThenPlateau(optimizer, cfg, steps_per_epoch)
    per_step, per_epoch = [], []
    for loss in val_losses:
        per_epoch.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps_per_epoch):
            per_step.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step_batch()
        schedule.step_epoch(loss)
    return per_step, per_epoch


def test_lr_linear_warmup_then_plateau_halving():
    cfg = TrainConfig(lr=1.0, warmup_epochs=2, plateau_factor=0.5, plateau_patience=3)
    losses = [9, 8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    per_step, per_epoch = lr_sequence(cfg, steps_per_epoch=2, val_losses=losses)
    assert per_step[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # linear over 4 warmup steps
    # plateau watches from epoch 3 on: best 1.0 at epoch 3, then 3 epochs of patience, then halve;
    # after a reduction the counter restarts: 3 more flat epochs, then halve again
    assert per_epoch == pytest.approx([0.25, 0.75, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    _, later = lr_sequence(cfg, 2, losses + [1.0])
    assert later[-1] == pytest.approx(0.25)


def test_no_warmup_starts_at_full_lr():
    per_step, _ = lr_sequence(TrainConfig(lr=0.1, warmup_epochs=0), 3, [1.0])
    assert per_step == pytest.approx([0.1, 0.1, 0.1])


def test_two_epochs_beat_trivial_predictions(data64):
    result = train(TrainConfig(epochs=2, **FAST), data64, log=None)
    valid = data64["valid"]
    trivial = {}
    for name, value in (("all-background", -20.0), ("all-tumour", 20.0)):
        meter = SegmentationMeter()
        meter.update(torch.full((len(valid), 1, *valid.native_hw), value), torch.from_numpy(valid.native_mask(slice(None))[:, None]))
        trivial[name] = meter.compute()["dice"]
    best = max(h["val_dice"] for h in result.history)
    assert best == result.best_val_metrics["dice"]
    assert best > 2 * max(trivial.values()), (best, trivial)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_training_is_reproducible(data64):
    a = train(TrainConfig(epochs=1, **FAST), data64, log=None)
    b = train(TrainConfig(epochs=1, **FAST), data64, log=None)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.best_val_metrics == b.best_val_metrics


def test_on_epoch_state_resumes_the_run(data64):
    states = []
    full = train(TrainConfig(epochs=2, **FAST), data64, on_epoch=lambda m, state: states.append(state()), log=None)
    resumed = train(TrainConfig(epochs=2, **FAST), data64, resume_state=states[0], log=None)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == full.history[0]  # restored, not retrained
    assert resumed.history[1]["lr"] == full.history[1]["lr"]  # optimiser and schedule restored
    # resuming a finished run trains nothing and returns the checkpoint's best weights
    done = train(TrainConfig(epochs=1, **FAST), data64, resume_state=states[0], log=None)
    assert len(done.history) == 1
    for key, value in states[0]["best_model"].items():
        assert torch.equal(done.model.state_dict()[key], value)


def test_non_finite_loss_stops_training(data64):
    from tumorseg.engine import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        train(TrainConfig(epochs=1, **{**FAST, "lr": 1e30}), data64, log=None)


def test_config_rejects_unknown_and_invalid_fields():
    with pytest.raises(ConfigError, match="unknown config field.*dice_wieght"):
        TrainConfig.from_dict({"dice_wieght": 1.0})
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        TrainConfig(loss_type="focal")
    from tumorseg.model import check_model

    with pytest.raises(ConfigError, match="--resize 100: Unet-resnet18 downsamples by 32; use a multiple of 32 .e.g. 96 or 128"):
        check_model("Unet", "resnet18", 100)
    assert check_model("DeepLabV3Plus", "resnet18", 48) == 16 and check_model("PSPNet", "resnet18", 40) == 8


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_cli(
        "-m", "tumorseg.train", "--data", str(synthetic_dir), "--out", str(out), "--resize", "64",
        "--epochs", "2", "--encoder-weights", "none", "--lr", "5e-3", "--batch-size", "8", "--num-workers", "1",
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_cli_writes_the_four_files(cli_run):
    out, proc = cli_run
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "history.csv", "model.pt", "predictions.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["valid"]) >= {"dice", "iou", "precision", "recall", "f1", "dice_loss"}
    assert set(metrics["test"]) >= {"dice", "iou", "precision", "recall", "f1", "dice_loss"}
    assert metrics["dataset"]["name"] == "built-in synthetic" and metrics["dataset"]["layout"] == "coco"
    assert "seed_reported_test" not in metrics  # the seed's Kaggle numbers are not about this data
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert metrics["valid"]["dice"] == pytest.approx(history["val_dice"].max())
    assert "epoch   2/2" in proc.stdout


@pytest.mark.slow
def test_model_file_reloads_to_identical_predictions(cli_run, data64):
    out, _ = cli_run
    model, cfg, payload = load_model(out / "model.pt")
    assert cfg.resize_px == 64 and payload["best_epoch"] in (1, 2)
    test_metrics, _ = evaluate(model, data64["test"], cfg)
    saved = json.loads((out / "metrics.json").read_text())["test"]
    assert test_metrics == pytest.approx(saved)
    again, _, _ = load_model(out / "model.pt")
    images = data64["test"].images[:4]
    assert torch.equal(predict_logits(model, images, cfg), predict_logits(again, images, cfg))


def test_load_model_refuses_foreign_files(tmp_path):
    from tumorseg.errors import UserError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a tumorseg model file"):
        load_model(tmp_path / "evil.pt")
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="no 'tumorseg-model' marker"):
        load_model(tmp_path / "plain.pt")


def test_imagenet_weights_offline_fail_fast_with_instructions(synthetic_dir, tmp_path):
    cache = tmp_path / "cache"
    proc = run_cli(
        "-m", "tumorseg.train", "--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
        "--encoder-weights", "imagenet", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hf download smp-hub/resnet18.imagenet" in proc.stderr and "--encoder-weights none" in proc.stderr
    # fail fast: refused before any image was decoded or cached
    assert "data ready" not in proc.stdout and not (cache.exists() and any(cache.iterdir()))


def test_encoder_weights_from_a_local_file(tmp_path):
    from tumorseg.model import create_model, load_encoder_state

    donor = create_model(None)
    torch.save(donor.state_dict(), tmp_path / "weights.pth")
    model = create_model(load_encoder_state(str(tmp_path / "weights.pth")))
    for key, value in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    rgb = {k: v for k, v in donor.encoder.state_dict().items()}
    rgb["conv1.weight"] = rgb["conv1.weight"].repeat(1, 3, 1, 1)  # an ImageNet-style 3-channel conv1
    model = create_model(rgb)
    assert torch.allclose(model.encoder.conv1.weight, 3 * donor.encoder.conv1.weight)
