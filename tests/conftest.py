"""Shared fixtures. Tests never touch the network or the user's caches."""

from __future__ import annotations

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

TINY_SWEEP = ["--resize-choices", "64", "--encoder-weights", "none", "--batch-size", "8", "--lr-range", "1e-3,5e-3"]


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


@pytest.fixture(scope="session")
def finished_sweep(paths, tmp_path_factory):
    """A finished 6-trial sweep (2 logical GPUs, ASHA) with retrain and report: (run_dir, proc)."""
    ray_tmp = tmp_path_factory.mktemp("ray")
    args = sweep_args(paths, ray_tmp, "six", "--gpus", "2", "--num-samples", "6", "--epochs", "3",
                      "--grace-period", "1", "--reduction-factor", "3", "--seed", "1")
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return paths["storage"] / "six", proc
