"""Faults a long sweep must survive without losing finished work (issue: nothing lost)."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, run_cli, sweep_args
from fault_injection.faults import environment as fault_environment


@pytest.fixture(scope="module")
def faulty_sweep(paths, tmp_path_factory):
    """Trial 1's loss goes NaN, trial 2 runs out of memory, trial 3 crashes in every epoch >= 2,
    trial 4 crashes once after epoch 2."""
    ray_tmp = tmp_path_factory.mktemp("ray")
    args = sweep_args(paths, ray_tmp, "faulty", "--gpus", "2", "--num-samples", "6", "--epochs", "3",
                      "--grace-period", "3", "--max-failures", "1")
    proc = run_cli(*args, env=fault_environment("nan:1,oom:2,raise@2:3,crash@2:4"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = paths["storage"] / "faulty"
    return run_dir, pd.read_csv(run_dir / "trials.csv").set_index("trial_index")


def _results(run_dir, trial_dir):
    return [json.loads(line) for line in (run_dir / "tune" / trial_dir / "result.json").read_text().splitlines()]


@pytest.mark.slow
def test_crashing_trial_is_retried_then_recorded_as_failed(faulty_sweep):
    run_dir, table = faulty_sweep
    row = table.loc[3]
    assert row["status"] == "ERROR" and row["num_failures"] == 2  # first run + max_failures retries
    assert "injected fault in epoch 2" in row["failure_reason"]
    assert row["epochs_run"] == 1 and row["best_val_dice"] > 0  # what it did finish is kept


@pytest.mark.slow
def test_crashed_trial_resumes_from_its_checkpoint(faulty_sweep):
    run_dir, table = faulty_sweep
    row = table.loc[4]
    assert row["status"] == "COMPLETED" and row["num_failures"] == 1
    results = _results(run_dir, row["trial_dir"])
    first_attempt = [r for r in results if "resumed_from_epoch" not in r]
    assert [r["epoch"] for r in first_attempt] == [1, 2]
    # checkpoints: the first epoch's, then whenever their cost is under 5 % of the time since the last
    checkpointed = [r["epoch"] for r in first_attempt if "checkpoint_s" in r]
    assert checkpointed[0] == 1
    resumed = [r for r in results if "resumed_from_epoch" in r]
    # the retry continues after its latest checkpoint (not from its best epoch) and ends the budget
    assert resumed and resumed[0]["resumed_from_epoch"] == checkpointed[-1] and resumed[0]["epoch"] == checkpointed[-1] + 1
    assert resumed[-1]["epoch"] == 3


@pytest.mark.slow
def test_non_finite_loss_stops_at_once_and_never_wins(faulty_sweep):
    run_dir, table = faulty_sweep
    row = table.loc[1]
    assert row["status"] == "FAILED" and "non-finite" in row["failure_reason"]
    assert row["num_failures"] == 0 and row["epochs_run"] == 0  # stopped in its first epoch, not retried
    best = json.loads((run_dir / "best_config.json").read_text())
    assert best["trial_index"] not in (1, 2, 3)


@pytest.mark.slow
def test_out_of_memory_is_recorded_with_its_cause_not_retried(faulty_sweep):
    _, table = faulty_sweep
    row = table.loc[2]
    assert row["status"] == "FAILED" and row["num_failures"] == 0
    assert row["failure_reason"] == "out of memory at resize 64, batch 8"


@pytest.mark.slow
def test_sweep_retrain_and_report_finish_despite_faults(faulty_sweep):
    run_dir, table = faulty_sweep
    assert set(table.loc[[0, 4, 5], "status"]) == {"COMPLETED"}
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert "best" in final and "seed_recipe" in final
    page = (run_dir / "report.html").read_text()
    assert "out of memory at resize 64, batch 8" in page and "injected fault in epoch 2" in page


@pytest.mark.slow
def test_the_study_records_failures_as_fail_with_their_reasons(faulty_sweep):
    import optuna

    run_dir, table = faulty_sweep
    study = optuna.load_study(study_name="faulty", storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = {int(t.user_attrs["trial_name"].split("_")[1]): t for t in study.trials}
    assert sorted(trials) == list(table.index)  # one Optuna trial per Tune trial, the retried ones too
    for index in (1, 2, 3):  # non-finite loss, out of memory, crashed max_failures + 1 times
        assert trials[index].state.name == "FAIL" and trials[index].value is None
        assert trials[index].user_attrs["failure_reason"] == table.loc[index, "failure_reason"]
    for index in (0, 4, 5):
        assert trials[index].state.name == "COMPLETE" and trials[index].value == pytest.approx(table.loc[index, "best_val_dice"])
    assert sorted(trials[4].intermediate_values) == [1, 2, 3]  # epochs 1-2, then epoch 3 after the retry
    assert trials[3].intermediate_values.keys() == {1}  # what the crashing trial finished is kept


@pytest.mark.slow
def test_ctrl_c_during_retrain_then_resume_does_only_the_missing_work(paths, ray_tmp):
    args = sweep_args(paths, ray_tmp, "retrain-int", "--num-samples", "2", "--epochs", "2", "--grace-period", "2",
                      "--retrain-seeds", "2")
    driver = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = paths["storage"] / "retrain-int"
    deadline = time.monotonic() + 600
    while not (done := list((run_dir / "final" / "best").glob("*/seed0/metrics.json"))):
        assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before the first retrain"
        time.sleep(0.5)
    first = done[0]
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    done_before = first.stat().st_mtime_ns
    assert not (run_dir / "final" / "seed_recipe").exists()

    proc = run_cli(*sweep_args(paths, ray_tmp, "retrain-int", "--resume"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "retrain: best seed 0 already done" in proc.stdout
    assert first.stat().st_mtime_ns == done_before  # not redone
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    for recipe in ("best", "seed_recipe"):  # one key per recipe: the same configuration was resumed
        assert [p.name for p in (run_dir / "final" / recipe).iterdir()] == [final[recipe]["key"]]
        assert sorted(p.name for p in (run_dir / "final" / recipe / final[recipe]["key"]).iterdir()) == ["seed0", "seed1"]
    assert len(final["best"]["seeds"]) == 2 and final["best"]["ensemble"]["members"] == 2
    assert len(pd.read_csv(run_dir / "trials.csv")) == 2


def test_unwritable_storage_fails_before_any_trial(paths, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("-m", "search.run", "--storage", str(blocker / "results"), "--name", "x", timeout=60)
    assert proc.returncode == 2 and "--storage: cannot write to" in proc.stderr and "Traceback" not in proc.stderr
