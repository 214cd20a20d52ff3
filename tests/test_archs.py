"""Architectures, encoders and the optional search dimensions (issue 16).

The name and stride errors of both CLIs are in test_train.py / test_search.py's bad-flag tables.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import run_cli, sweep_args
from tumorseg.config import TrainConfig
from tumorseg.errors import ConfigError

# ----------------------------------------------------------------------------- weights per encoder


def _imagenet_style(encoder: str):
    """A 3-channel (ImageNet-style) encoder state of ``encoder`` and its first conv's key."""
    from tumorseg.model import create_model, first_conv_name

    model = create_model(None, in_channels=3, arch="Unet", encoder=encoder)
    return model.encoder.state_dict(), first_conv_name(model.encoder) + ".weight"


def test_weights_for_two_encoders_resolved_offline_from_a_folder(tmp_path):
    from safetensors.torch import save_file

    from tumorseg.model import create_model, load_encoder_states

    resnet, resnet_conv = _imagenet_style("resnet18")
    mobile, mobile_conv = _imagenet_style("mobilenet_v2")
    save_file(resnet, str(tmp_path / "resnet18.safetensors"))
    torch.save(mobile, tmp_path / "mobilenet_v2.pth")
    states = load_encoder_states(str(tmp_path), ["resnet18", "mobilenet_v2", "resnet18"])
    assert sorted(states) == ["mobilenet_v2", "resnet18"]
    for arch, encoder, donor, conv in (("FPN", "resnet18", resnet, resnet_conv), ("Unet", "mobilenet_v2", mobile, mobile_conv)):
        model = create_model(states[encoder], in_channels=1, arch=arch, encoder=encoder)
        loaded = model.encoder.state_dict()
        assert torch.allclose(loaded[conv], donor[conv].sum(1, keepdim=True))  # smp's rule for a grey input
        other = next(k for k in donor if k != conv and donor[k].is_floating_point() and donor[k].ndim == 4)
        assert torch.equal(loaded[other], donor[other])
    (tmp_path / "mobilenet_v2.pth").unlink()
    with pytest.raises(ConfigError, match=r"has no weights for encoder mobilenet_v2 \(expected mobilenet_v2.safetensors or"):
        load_encoder_states(str(tmp_path), ["resnet18", "mobilenet_v2"])
    with pytest.raises(ConfigError, match="one file cannot serve several encoders"):
        load_encoder_states(str(tmp_path / "resnet18.safetensors"), ["resnet18", "mobilenet_v2"])
    assert load_encoder_states("none", ["resnet18", "mobilenet_v2"]) == {}
    with pytest.raises(ConfigError, match="not resnet18 encoder weights"):  # the wrong encoder's file
        torch.save(mobile, tmp_path / "resnet18.pt")
        (tmp_path / "resnet18.safetensors").unlink()
        create_model(load_encoder_states(str(tmp_path), ["resnet18"])["resnet18"], encoder="resnet18")


def test_missing_hub_weights_name_the_hf_download_command_of_that_encoder(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("-m", "tumorseg.train", "--out", str(tmp_path / "out"), "--arch", "FPN", "--encoder", "mobilenet_v2",
                   "--encoder-weights", "imagenet", env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "`hf download smp-hub/mobilenet_v2.imagenet model.safetensors --revision " in proc.stderr
    proc = run_cli("-m", "tumorseg.train", "--out", str(tmp_path / "out"), "--encoder", "mobilenet_v2",
                   "--encoder-weights", "advprop", env=env, timeout=120)
    assert proc.returncode == 2
    assert "--encoder-weights advprop: smp lists no such weights for encoder mobilenet_v2 (it has: imagenet)" in proc.stderr


# ----------------------------------------------------------------------------- model files, augmentation


def test_model_file_records_the_arch_and_rebuilds_it(tmp_path):
    from tumorseg.checkpoint import load_model, save_model
    from tumorseg.model import create_model

    cfg = TrainConfig(resize_px=64, arch="FPN", encoder="mobilenet_v2", encoder_weights="none", channels_last=False)
    model = create_model(None, in_channels=2, arch=cfg.arch, encoder=cfg.encoder).eval()
    save_model(tmp_path / "model.pt", model, cfg)
    loaded, loaded_cfg, payload = load_model(tmp_path / "model.pt")
    assert (payload["arch"], payload["encoder"], payload["in_channels"]) == ("FPN", "mobilenet_v2", 2)
    assert type(loaded).__name__ == "FPN" and (loaded_cfg.arch, loaded_cfg.encoder) == ("FPN", "mobilenet_v2")
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_aug_strength_scales_rotation_shift_and_jitter_and_zero_leaves_flips():
    from tumorseg.transforms import train_transform

    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert names(train_transform(TrainConfig(aug_strength=0))) == ["HorizontalFlip", "VerticalFlip"]
    doubled = train_transform(TrainConfig(aug_strength=2)).transforms
    assert names(train_transform(TrainConfig(aug_strength=2))) == ["HorizontalFlip", "VerticalFlip", "Affine", "RandomBrightnessContrast"]
    affine, jitter = doubled[2], doubled[3]
    assert tuple(affine.rotate) == (-30.0, 30.0)  # 2 x the recipe's 15 degrees
    assert tuple(affine.translate_percent["x"]) == pytest.approx((-0.1, 0.1))
    assert tuple(jitter.brightness_limit) == pytest.approx((-0.4, 0.4))


# ----------------------------------------------------------------------------- the space and the table


def test_single_choice_dimensions_are_fixed_not_searched():
    import optuna

    from search.space import SearchSpace, define_by_run, seed_point

    default = SearchSpace()
    assert default.fixed_params() == {"arch": "Unet", "encoder": "resnet18", "batch_size": 16, "aug_strength": 1.0}
    point, _ = seed_point(default)
    assert not {"arch", "encoder", "batch_size", "aug_strength"} & set(point)
    wide = SearchSpace(archs=["FPN", "Unet"], encoders=["mobilenet_v2"], batch_sizes=[8, 32])
    assert wide.fixed_params() == {"encoder": "mobilenet_v2", "aug_strength": 1.0}
    point, notes = seed_point(wide)  # the seed recipe: Unet, batch 16 -> the nearest allowed, 8
    assert (point["arch"], point["batch_size"]) == ("Unet", 8) and notes == ["seed recipe batch_size 16 is not among [8, 32]: using 8"]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    define_by_run(wide)(trial)
    assert trial.params["arch"] in ("FPN", "Unet") and trial.params["batch_size"] in (8, 32) and "encoder" not in trial.params


def test_trials_table_drops_unsearched_dimensions_and_finds_the_pareto_front(tmp_path):
    from search.trials import pareto_front, write_table

    base = {"trial_id": "t", "status": "COMPLETED", "epochs_run": 2}
    rows = [  # (gflops, dice): trial 2 is beaten by trial 1 (cheaper and better); 3 is the priciest but best
        {**base, "trial_index": i, "arch": arch, "gflops": g, "params_m": 10.0, "best_val_dice": d}
        for i, (arch, g, d) in enumerate([("Unet", 2.6, 0.50), ("FPN", 1.2, 0.55), ("FPN", 2.2, 0.52), ("Unet", 5.0, 0.60)])
    ]
    table = write_table(rows, tmp_path / "trials.csv")
    assert "arch" in table and not {"encoder", "batch_size", "aug_strength"} & set(table)
    assert list(pareto_front(table)["trial_index"]) == [1, 3]


def test_report_plots_dice_against_cost(tmp_path):
    from search.report import cost_section_html
    from search.trials import write_table

    rows = [{"trial_index": i, "trial_id": f"t{i}", "status": "COMPLETED", "epochs_run": 1, "encoder": enc, "gflops": g,
             "params_m": p, "train_images_per_s": 50.0, "best_val_dice": d}
            for i, (enc, g, p, d) in enumerate([("resnet18", 0.66, 14.3, 0.4), ("mobilenet_v2", 0.3, 6.6, 0.45)])]
    html = cost_section_html(write_table(rows, tmp_path / "trials.csv"), {"arch": "FPN"})
    assert "FPN-resnet18" in html and "FPN-mobilenet_v2" in html and "Pareto front" in html
    assert "<td>1</td><td>FPN-mobilenet_v2</td><td>0.4500</td><td>0.30</td><td>6.6</td>" in html  # the only front member
    assert "<td>0</td><td>FPN-resnet18</td>" not in html


# ----------------------------------------------------------------------------- a sweep over archs x encoders


@pytest.mark.slow
def test_sweep_over_two_archs_and_two_encoders_then_predict(paths, ray_tmp, tmp_path):
    """Every (arch, encoder) pair trains at 64 px from scratch; the trials record their cost; the
    final model files rebuild their architecture in predict."""
    pairs = [("Unet", "resnet18"), ("FPN", "resnet18"), ("Unet", "mobilenet_v2"), ("FPN", "mobilenet_v2")]
    points = [{"resize_px": 64, "loss_type": "dice", "lr": 3e-3, "warmup_epochs": 0, "weight_decay": 0.01,
               "arch": arch, "encoder": encoder} for arch, encoder in pairs]
    (tmp_path / "points.json").write_text(json.dumps(points))
    proc = run_cli(*sweep_args(paths, ray_tmp, "archs", "--archs", "Unet,FPN", "--encoders", "resnet18,mobilenet_v2",
                               "--points", str(tmp_path / "points.json"), "--num-samples", "4", "--epochs", "1",
                               "--grace-period", "1", "--cpus-per-trial", "1"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = paths["storage"] / "archs"
    table = pd.read_csv(run_dir / "trials.csv")
    assert sorted(zip(table["arch"], table["encoder"])) == sorted(pairs) and set(table["status"]) == {"COMPLETED"}
    assert "batch_size" not in table and "aug_strength" not in table  # not searched: no column
    cost = table.set_index(["arch", "encoder"])
    assert cost.loc[("Unet", "resnet18"), "params_m"] == pytest.approx(14.321937)
    assert cost.loc[("FPN", "mobilenet_v2"), "gflops"] < cost.loc[("Unet", "resnet18"), "gflops"]
    assert (table["train_images_per_s"] > 0).all()
    assert "Dice against cost" in (run_dir / "report.html").read_text()

    best = json.loads((run_dir / "best_config.json").read_text())
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    image = next((paths["data"] / "test").glob("*.jpg"))
    for recipe, (arch, encoder) in (("best", (best["params"]["arch"], best["params"]["encoder"])), ("seed_recipe", ("Unet", "resnet18"))):
        model_file = run_dir / "final" / final[recipe]["runs"][0] / "model.pt"
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
        assert (payload["arch"], payload["encoder"]) == (arch, encoder)
        out = tmp_path / f"predict-{recipe}"
        proc = run_cli("-m", "tumorseg.predict", str(model_file), str(image), "--out", str(out), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        mask = np.asarray(Image.open(out / f"{image.stem}_mask.png"))
        assert mask.shape == Image.open(image).size[::-1] and set(np.unique(mask)) <= {0, 255}  # the native size
