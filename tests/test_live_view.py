"""What search.run prints: the live view, the INTERRUPTED label, the closing block, and Ray kept quiet."""

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import ROOT, run_cli, sweep_args
from search.live import SweepProgress, closing_block, trial_line
from search.trials import trial_status


def test_trial_line_shows_status_epoch_budget_dice_resize_and_loss():
    row = {"epochs_run": 2, "last_val_dice": 0.12345, "best_val_dice": 0.2, "resize_px": 96, "loss_type": "dice"}
    assert trial_line("trial_003", "STOPPED_EARLY", row, 4) == \
        "trial_003 STOPPED_EARLY  epoch 2/4  val_dice 0.1235  best 0.2000  resize 96  loss dice"


def test_header_counts_finished_trials_busy_slots_best_and_eta():
    progress = SweepProgress(total_trials=4, slots=2, started_s=0.0)
    progress.update("a", "trial_000", {"status": "COMPLETED", "best_val_dice": 0.3})
    progress.update("b", "trial_001", {"status": "FAILED", "best_val_dice": 0.9})  # failed: never "best"
    progress.update("c", "trial_002", {"status": "RUNNING", "best_val_dice": 0.1})
    # 2 of 4 done in 60 s: the other 2 take about 60 s more
    assert progress.header(now_s=60.0) == \
        "-- 2/4 trials done, 1/2 slots busy, best 0.3000 (trial_000), 1:00 elapsed, ETA ~1:00"


def test_header_of_a_resumed_sweep_counts_a_trial_finished_before_once():
    progress = SweepProgress(total_trials=4, slots=2, started_s=0.0)
    progress.done_at_start = {"a", "b"}  # the earlier run's; a had ended after Tune's last snapshot
    progress.update("a", "trial_000", {"status": "COMPLETED", "best_val_dice": 0.3})  # it ends again, untrained
    progress.update("c", "trial_002", {"status": "STOPPED_EARLY", "best_val_dice": 0.1})
    # 3 of 4 done; this run finished 1 (c) in 60 s: the last takes about 60 s more
    assert progress.header(now_s=60.0) == \
        "-- 3/4 trials done, 0/2 slots busy, best 0.3000 (trial_000), 1:00 elapsed, ETA ~1:00"


def test_ctrl_c_label_is_interrupted_and_asha_label_stays_stopped_early():
    assert trial_status("TERMINATED", {"epoch": 1}, 4, interrupted=True) == "INTERRUPTED"
    assert trial_status("TERMINATED", {"epoch": 1}, 4) == "STOPPED_EARLY"
    assert trial_status("TERMINATED", {"epoch": 4}, 4) == "COMPLETED"
    assert trial_status("TERMINATED", {"epoch": 1, "failure_reason": "non-finite loss"}, 4, interrupted=True) == "FAILED"


class FakeTrial(SimpleNamespace):
    def __str__(self):
        return self.name


def test_callbacks_label_trials_still_running_at_the_end_interrupted(tmp_path):
    """Tune marks both ASHA's stops and the trials it stops at Ctrl-C TERMINATED; the callbacks tell them apart."""
    from search.callbacks import LiveViewCallback, TrialsTableCallback

    lines = []
    table = TrialsTableCallback(tmp_path, max_epochs=4, min_interval_s=0)
    live = LiveViewCallback(tmp_path, total_trials=2, max_epochs=4, slots=2, print_fn=lines.append)
    config = {"resize_px": 64, "loss_type": "dice", "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 1e-4}
    asha = FakeTrial(name="trial_000", trial_id="a0", status="RUNNING", config=config, last_result={})
    ctrl_c = FakeTrial(name="trial_001", trial_id="b1", status="RUNNING", config=config, last_result={})
    trials = [asha, ctrl_c]
    for callback in (table, live):
        for trial in trials:
            callback.on_trial_start(0, trials, trial)
    for trial in trials:
        trial.last_result = {"epoch": 1, "val_dice": 0.25, "best_val_dice": 0.25}
        for callback in (table, live):
            callback.on_trial_result(0, trials, trial, trial.last_result)
    for callback in (table, live):
        callback.on_trial_complete(0, trials, asha)  # ASHA's stop: Tune calls this while status is RUNNING
    asha.status = ctrl_c.status = "TERMINATED"  # Ctrl-C: Tune stops the rest without on_trial_complete
    for callback in (table, live):
        callback.on_experiment_end(trials)

    csv = pd.read_csv(tmp_path / "trials.csv")
    assert csv.set_index("trial_id")["status"].to_dict() == {"a0": "STOPPED_EARLY", "b1": "INTERRUPTED"}
    assert lines[4].startswith("trial_000 STOPPED_EARLY  epoch 1/4")
    assert lines[5].startswith("-- 1/2 trials done, 1/2 slots busy, best 0.2500 (trial_000)")
    assert lines[6].startswith("trial_001 INTERRUPTED    epoch 1/4")
    assert lines[7].startswith("-- 1/2 trials done, 0/2 slots busy")


def test_closing_block_of_one_seed_has_no_spread_and_names_real_paths(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.pt").write_bytes(b"")
    best = {"trial_index": 3, "best_val_dice": 0.5, "params": {"resize_px": 64, "lr": 0.00123}}
    metric = {"mean": 0.4, "std": 0.0}
    summary = {"best": {"seeds": [0], "test": dict.fromkeys(["dice", "f1", "precision", "recall"], metric)}}
    text = closing_block(tmp_path, "my-run", "/data/results", best, summary, tmp_path / "report.html")
    assert "+-" not in text
    assert "trial_003: val dice 0.5000  (resize_px 64, lr 0.00123)" in text
    assert "test (best, 1 seed)  dice 0.4000  f1 0.4000" in text
    assert f"python -m tumorseg.predict {tmp_path}/final/model.pt IMAGES_OR_FOLDER" in text  # no shipped ensemble
    assert "tumorseg.export" not in text
    assert "python -m search.run --name my-run --storage /data/results --resume" in text
    (tmp_path / "final" / "model").mkdir()  # the final stage's shipped model: predict and export take the run folder
    text = closing_block(tmp_path, "my-run", "/data/results", best, summary, tmp_path / "report.html")
    assert f"python -m tumorseg.predict {tmp_path} IMAGES_OR_FOLDER" in text
    assert f"python -m tumorseg.export {tmp_path}" in text


RAY_NOISE = ("Experiment state snapshotting", "Checkpoint successfully created", "Trial status:", "Configuration for experiment",
             "Token authentication is enabled", "A new study created")


@pytest.mark.slow
def test_three_trial_sweep_prints_the_live_view_and_next_steps_and_no_ray_noise(paths, ray_tmp):
    proc = run_cli(*sweep_args(paths, ray_tmp, "live", "--num-samples", "3", "--epochs", "2", "--grace-period", "1"),
                   timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    run_dir = paths["storage"] / "live"
    for noise in RAY_NOISE:
        assert noise not in out, noise
    assert "(1 CPU each, bound by CPUs)" in out and f"Ray's own log: {run_dir / 'ray.log'}" in out
    table = pd.read_csv(run_dir / "trials.csv")
    best = table["best_val_dice"].max()
    assert "-- 3/3 trials done, 0/" in out and f"best {best:.4f} (trial_" in out
    epoch_lines = [line for line in proc.stdout.splitlines() if " epoch " in line and "val_dice" in line]
    assert len(epoch_lines) >= 3 and all(line.startswith("trial_") for line in epoch_lines)
    assert (run_dir / "ray.log").is_file() and list((run_dir / "tune").glob("trial_000_*/stderr"))  # Ray's talk kept
    assert (run_dir / "final" / "model.pt").is_file()
    assert f"model        {run_dir / 'final' / 'model.pt'}" in proc.stdout
    assert f"python -m search.run --name live --storage {paths['storage']} --resume" in proc.stdout
    assert len(out.splitlines()) < 60  # was ~390 lines for 6 trials


@pytest.mark.slow
def test_ctrl_c_marks_running_trials_interrupted_in_trials_csv(paths, ray_tmp):
    args = sweep_args(paths, ray_tmp, "ctrl-c", "--num-samples", "2", "--epochs", "30", "--grace-period", "30")
    driver = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = paths["storage"] / "ctrl-c" / "trials.csv"
    deadline = time.monotonic() + 600
    while not (csv.is_file() and (pd.read_csv(csv)["epochs_run"] >= 1).any()):
        assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before a trial reported"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 130, stderr[-3000:]
    statuses = set(pd.read_csv(csv)["status"])
    assert "INTERRUPTED" in statuses and "STOPPED_EARLY" not in statuses, statuses
    assert "INTERRUPTED" in stdout and "--name ctrl-c" in stderr and "--resume" in stderr


def test_live_view_shows_the_result_being_reported_not_the_previous_one(tmp_path):
    """Tune calls on_trial_result before it updates trial.last_result: the line must show the new epoch."""
    from search.callbacks import LiveViewCallback

    lines = []
    live = LiveViewCallback(tmp_path, total_trials=1, max_epochs=4, slots=1, print_fn=lines.append)
    trial = FakeTrial(name="trial_000", trial_id="a0", status="RUNNING", last_result={"params_m": 14.3},
                      config={"resize_px": 64, "loss_type": "dice", "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 1e-4})
    live.on_trial_result(0, [trial], trial, {"params_m": 14.3})  # the start-up report: no line
    live.on_trial_result(0, [trial], trial, {"epoch": 1, "val_dice": 0.3, "best_val_dice": 0.3})
    assert len(lines) == 1 and lines[0].startswith("trial_000 RUNNING        epoch 1/4  val_dice 0.3000  best 0.3000")
