"""A 3-trial sweep on a flat pairs folder: grouped splits carved once, recorded, reused, reported."""

import json
from pathlib import Path

import pytest

from conftest import TINY_SWEEP, run_cli
from tumorseg.synthetic import SyntheticSpec, make_synthetic


@pytest.mark.slow
def test_three_trial_sweep_on_flat_pairs_with_grouped_splits(tmp_path, ray_tmp):
    spec = SyntheticSpec(image_px=64, n_train=24, n_valid=8, n_test=8, layout="pairs", slices_per_case=4)
    root = make_synthetic(tmp_path / "pairs", spec)
    assert not (root / "train").exists()  # flat: images/ + masks/, no splits
    args = ["-m", "search.run", "--data", str(root), "--storage", str(tmp_path / "results"), "--name", "pairs",
            "--ray-temp-dir", str(ray_tmp), "--no-dashboard", *TINY_SWEEP,
            "--num-samples", "3", "--epochs", "1", "--grace-period", "1"]
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "results" / "pairs"

    splits = json.loads((run / "splits.json").read_text())
    case_sets = {split: {Path(name).stem.rsplit("_", 1)[0] for name in names} for split, names in splits.items()}
    assert sum(len(names) for names in splits.values()) == 40 and all(splits.values())
    assert not (case_sets["train"] & case_sets["valid"] or case_sets["train"] & case_sets["test"]
                or case_sets["valid"] & case_sets["test"]), case_sets  # no case in two splits

    assert "dataset: built-in synthetic (pairs" in proc.stdout and "trivial baselines, test Dice" in proc.stdout
    assert "(carved by case)" in (run / "data_summary.txt").read_text()
    final = json.loads((run / "final" / "metrics.json").read_text())
    assert final["dataset"]["layout"] == "pairs" and final["dataset"]["splits_from"] == "file"  # the run's splits.json
    assert final["dataset"]["split_sizes"] == {k: len(v) for k, v in splits.items()}  # the retrain reused the carve
    assert "seed_reported_test" not in final
    report = (run / "report.html").read_text()
    assert "trivial baselines" in report and "seed run as originally reported" not in report
