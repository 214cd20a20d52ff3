"""Shared fixtures. Tests never touch the network or the user's caches."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Before anything imports huggingface_hub / albumentations / ray.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tumorseg")


@pytest.fixture(autouse=True)
def _isolated_cache(session_tmp, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(session_tmp / "cache"))


@pytest.fixture(scope="session")
def synthetic_dir(session_tmp) -> Path:
    """A tiny synthetic dataset (96 px images) shared by the whole session."""
    from tumorseg.synthetic import SyntheticSpec, make_synthetic

    return make_synthetic(session_tmp / "synthetic", SyntheticSpec(image_px=96, n_train=96, n_valid=24, n_test=16))


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """The real dev dataset; skipped (with the reason) where it is not present."""
    path = Path(os.environ.get("TUMORSEG_DEV_DATA", ROOT.parent / "shared" / "data" / "brain-tumor-dev"))
    if not (path / "train" / "_annotations.coco.json").is_file():
        pytest.skip(f"real dev data not found at {path} (set TUMORSEG_DEV_DATA to the Kaggle-layout folder)")
    return path


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    """Run ``python -m ...`` in a subprocess with the test environment; returns CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
    )


# ----------------------------------------------------------------------------- sweeps

# --final-epochs 1: the final stage's budget is its own (tests check it), and the cheapest
TINY_SWEEP = ["--resize-choices", "64", "--encoder-weights", "none", "--batch-size", "8", "--lr-range", "1e-3,5e-3",
              "--final-epochs", "1"]


def sweep_args(paths: dict, ray_tmp: Path, name: str, *extra: str) -> list[str]:
    """``python -m search.run`` arguments for a tiny CPU sweep on the session's synthetic data."""
    return ["-m", "search.run", "--data", str(paths["data"]), "--storage", str(paths["storage"]), "--name", name,
            "--ray-temp-dir", str(ray_tmp), "--no-dashboard", *TINY_SWEEP, *extra]


@pytest.fixture(scope="session")
def paths(synthetic_dir, tmp_path_factory) -> dict:
    return {"data": synthetic_dir, "storage": tmp_path_factory.mktemp("results")}


@pytest.fixture
def ray_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must stay under 107 chars


# The finished sweep's six trials, evaluated in this order (--points), so that what ASHA stops is
# certain by construction, whatever order the trials reach a rung in: trials 0-2 are one good
# point (identical, so equal scores: none is below another's cutoff); trials 3-5 are hopeless
# (lr 1e-5: after one epoch still the untrained model, Dice ~0.05 vs ~0.11 for the good point).
# With 2 trials at a time, a hopeless trial starts only after two good ones ended, so at its
# rung (epoch 1) at least 2 good and at most 2 hopeless scores are recorded: the 2/3 quantile
# ASHA cuts at (reduction factor 3) is a good score, and every hopeless trial is stopped there.
GOOD_POINT = {"resize_px": 64, "loss_type": "dice", "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 0.01}
HOPELESS_POINTS = [  # different losses and decays, so the report's importances see varied parameters
    {"resize_px": 64, "loss_type": "dice", "lr": 1e-5, "warmup_epochs": 0, "weight_decay": 0.001},
    {"resize_px": 64, "loss_type": "dice_bce", "dice_weight": 1.0, "bce_weight": 0.5, "lr": 1.5e-5, "warmup_epochs": 1,
     "weight_decay": 0.01},
    {"resize_px": 64, "loss_type": "dice_focal", "dice_weight": 0.5, "focal_weight": 1.0, "focal_gamma": 2.0, "lr": 2e-5,
     "warmup_epochs": 0, "weight_decay": 0.05},
]
SIX_POINTS = [GOOD_POINT] * 3 + HOPELESS_POINTS

# Two device ids no CUDA device has: torch (driver and trials) sees no device, Ray schedules 2
# logical GPUs and hands each trial one of these ids. ("" would hide the devices too, but Ray
# refuses to start with more GPUs than CUDA_VISIBLE_DEVICES lists.)
NO_CUDA = {"CUDA_VISIBLE_DEVICES": "-1,-2"}


@pytest.fixture(scope="session")
def finished_sweep(paths, tmp_path_factory):
    """A finished 6-trial sweep (2 logical GPUs, ASHA) with retrain and report: (run_dir, proc).

    The same on every machine: ``NO_CUDA`` hides every CUDA device, so the 2 GPUs are logical
    ones, the driver warns so, and every trial trains on the CPU (identical points score alike).
    """
    import json

    ray_tmp = tmp_path_factory.mktemp("ray")
    points = ray_tmp.parent / "six-points.json"
    points.write_text(json.dumps(SIX_POINTS))
    args = sweep_args(paths, ray_tmp, "six", "--gpus", "2", "--num-samples", "6", "--epochs", "3",
                      "--grace-period", "1", "--reduction-factor", "3", "--seed", "1", "--lr-range", "1e-5,5e-3",
                      "--points", str(points))
    if importlib.util.find_spec("mlflow") is not None:  # tests/test_mlflow.py reads the runs back
        args += ["--mlflow", str(ray_tmp.parent / "mlflow-six")]
    proc = run_cli(*args, env=NO_CUDA, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return paths["storage"] / "six", proc
