"""--mlflow: every trial a run nested under the sweep's run, read back through the MLflow client."""

import json
import os
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest

import conftest
from search.rundir import SweepSettings
from tumorseg.errors import ConfigError

mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install -e '.[mlflow]'")

from search import tracking


def test_mlflow_flag_without_mlflow_installed_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from search.run import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["--storage", str(tmp_path / "results"), "--name", "x", "--mlflow", str(tmp_path / "mlflow")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("search.run: error: --mlflow needs MLflow, which is not installed; install it with "
                   "pip install -e '.[mlflow]'\n")
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow").exists()  # before anything ran


def test_a_folder_is_an_sqlite_store_and_a_uri_is_kept():
    assert tracking.tracking_uri("/data/mlf") == ("sqlite:////data/mlf/mlflow.db", "file:///data/mlf/artifacts")
    assert tracking.tracking_uri("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None)
    assert tracking.tracking_uri("sqlite:///x.db") == ("sqlite:///x.db", None)


def test_a_store_that_cannot_be_written_or_reached_is_one_line_naming_the_flag(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        server = f"http://127.0.0.1:{s.getsockname()[1]}"
    for target, shown in ((str(blocker / "mlflow"), ".*a-file/mlflow"), (server, server)):
        settings = SweepSettings(name="s", storage=str(tmp_path), mlflow=target)
        with pytest.raises(ConfigError, match=f"^--mlflow {shown}: cannot log there \\(") as err:
            tracking.open_sweep_run(settings, {})
        assert "\n" not in str(err.value)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick-failure settings were only for the check


def _history(client, run_id: str, key: str = "val_dice") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_resumed_runs_log_no_run_and_no_epoch_twice(tmp_path):
    settings = SweepSettings(name="s", storage=str(tmp_path), mlflow=str(tmp_path / "mlflow"))
    settings.run_dir.mkdir()
    (settings.run_dir / "sweep.json").write_text("{}")
    info = tracking.open_sweep_run(settings, {"batch_size": 8})
    tracking.record_sweep_run(settings.run_dir, info)
    runs = tracking.TrialRuns(info)
    runs.start("t1", "trial_000", {"lr": 1e-3, "loss_type": "dice"})
    for epoch, dice in ((1, 0.1), (2, 0.2)):
        runs.epoch("t1", "trial_000", {}, {"epoch": epoch, "val_dice": dice, "best_val_dice": dice})
    runs.start("t2", "trial_001", {"lr": 1e-5})
    runs.epoch("t2", "trial_001", {}, {"epoch": 1, "val_dice": 0.05, "best_val_dice": 0.05})

    # the driver dies; --resume: the parent run from sweep.json, a fresh TrialRuns (as Tune restores callbacks)
    again = tracking.open_sweep_run(settings, {"batch_size": 8})
    assert again == info
    runs = tracking.TrialRuns(again)
    runs.start("t1", "trial_000", {"lr": 1e-3, "loss_type": "dice"})
    for epoch, dice in ((2, 0.2), (3, 0.3)):  # epoch 2 reported again from an older checkpoint
        runs.epoch("t1", "trial_000", {}, {"epoch": epoch, "val_dice": dice, "best_val_dice": dice, "lr": float("nan")})
    runs.epoch("t2", "trial_001", {}, {"epoch": 1, "val_dice": 0.0, "best_val_dice": 0.0, "failure_reason": "nan loss"})
    runs.start("t3", "trial_002", {"lr": 1e-4})
    runs.start("lost", "trial_002", {"lr": 1e-4})  # started before the kill, not in Tune's saved state
    runs.end("t1", "COMPLETED")
    runs.end("t2", "FAILED", "training loss became non-finite (lr 1e-05)")
    # t3 finished in trials.csv but its run was never closed (the driver died in between)
    pd.DataFrame({"trial_id": ["t1", "t2", "t3"], "status": ["COMPLETED", "FAILED", "STOPPED_EARLY"],
                  "failure_reason": [None, "training loss became non-finite (lr 1e-05)", None]}).to_csv(
        settings.run_dir / "trials.csv", index=False)
    tracking.close_sweep_run(settings.run_dir, finished=True)

    client = tracking.client(info["uri"])
    children = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
    by_name = {r.info.run_name: r for r in children}
    assert sorted(r.data.tags[tracking.TRIAL_ID_TAG] for r in children) == ["t1", "t2", "t3"]  # "lost" deleted
    first, second = by_name["trial_000"], by_name["trial_001"]
    assert _history(client, first.info.run_id) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert client.get_metric_history(first.info.run_id, "lr") == []  # not finite: not logged
    assert first.data.params == {"lr": "0.001", "loss_type": "dice"}
    assert (first.info.status, first.data.tags[tracking.STATUS_TAG]) == ("FINISHED", "COMPLETED")
    assert _history(client, second.info.run_id) == [(1, 0.05)]
    assert (second.info.status, second.data.tags[tracking.STATUS_TAG]) == ("FAILED", "FAILED")
    assert second.data.tags[tracking.REASON_TAG] == "training loss became non-finite (lr 1e-05)"
    third = by_name["trial_002"]
    assert (third.info.status, third.data.tags[tracking.STATUS_TAG]) == ("FINISHED", "STOPPED_EARLY")
    assert tracking.REASON_TAG not in third.data.tags
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "s"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"sweep.json", "trials.csv"}
    assert parent.data.params["trial.batch_size"] == "8" and parent.data.params["epochs"] == "20"
    assert json.loads((settings.run_dir / "sweep.json").read_text())["mlflow"] == info


@pytest.mark.slow
def test_sweep_trials_are_nested_runs_with_params_metrics_status_and_the_final_artifacts(finished_sweep):
    run_dir, proc = finished_sweep
    info = json.loads((run_dir / "sweep.json").read_text())["mlflow"]
    assert f"MLflow: sweep run {info['parent_run_id']}" in proc.stdout
    client = tracking.client(info["uri"])
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.run_name == "six" and parent.info.status == "FINISHED"
    assert parent.data.params["num_samples"] == "6" and parent.data.params["grace_period"] == "1"
    table = pd.read_csv(run_dir / "trials.csv").set_index("trial_id")
    assert parent.data.metrics["best_val_dice"] == pytest.approx(table["best_val_dice"].max())
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert parent.data.metrics["test_dice_best"] == pytest.approx(final["best"]["test"]["dice"]["mean"])

    children = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
    assert sorted(r.data.tags[tracking.TRIAL_ID_TAG] for r in children) == sorted(table.index)  # one run per trial
    for run in children:
        row = table.loc[run.data.tags[tracking.TRIAL_ID_TAG]]
        assert run.info.run_name == f"trial_{row['trial_index']:03d}"
        assert run.data.params == {k: str(v) for k, v in conftest.SIX_POINTS[row["trial_index"]].items()}
        assert run.data.tags[tracking.STATUS_TAG] == row["status"] and run.info.status == "FINISHED"
        lines = (run_dir / "tune" / row["trial_dir"] / "result.json").read_text().splitlines()
        curve = [r for r in map(json.loads, lines) if r.get("epoch", 0) > 0]
        assert _history(client, run.info.run_id) == [(r["epoch"], pytest.approx(r["val_dice"])) for r in curve]
    stopped = [r for r in children if r.data.tags[tracking.STATUS_TAG] == "STOPPED_EARLY"]
    assert len(stopped) == 3 and all(len(_history(client, r.info.run_id)) == 1 for r in stopped)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "trials.csv", "sweep.json", "final"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "final")} == {"final/model.pt", "final/metrics.json"}
    local = client.download_artifacts(parent.info.run_id, "final/metrics.json", str(run_dir.parent / "mlflow-download"))
    assert json.loads(Path(local).read_text()) == final


def test_a_tracking_failure_mid_sweep_is_one_warning_and_the_sweep_goes_on(tmp_path, capsys):
    from types import SimpleNamespace

    from search.callbacks import MLflowCallback

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # the store's folder cannot exist: every call fails
    info = {"uri": f"sqlite:///{blocker}/sub/mlflow.db", "experiment_id": "1", "parent_run_id": "p"}
    callback = MLflowCallback(info, max_epochs=3)
    trial = SimpleNamespace(trial_id="t1", config={"lr": 1e-3}, status="RUNNING", last_result={})
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, {"epoch": 1, "val_dice": 0.1})
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow logging stopped (")
