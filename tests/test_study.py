"""The sweep's Optuna study: URLs and passwords, the mirror of trials.csv, resume, optuna-dashboard."""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest

from search import study as studydb
from search.space import SearchSpace, define_by_run
from tumorseg.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- URLs


def test_urls_work_from_any_folder_and_passwords_are_never_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert studydb.normalise("runs/study.db") == f"sqlite:///{tmp_path}/runs/study.db"
    assert studydb.normalise("sqlite:///runs/study.db") == f"sqlite:///{tmp_path}/runs/study.db"
    assert studydb.normalise("sqlite:////abs/study.db") == "sqlite:////abs/study.db"
    assert studydb.redact("postgresql://ann:s3cret@db.lan:5433/sweeps") == "postgresql://ann@db.lan:5433/sweeps"
    assert studydb.redact("postgresql://ann@db.lan/sweeps") == "postgresql://ann@db.lan/sweeps"
    argv = ["--study-storage", "postgresql://ann:s3cret@db/x", "--study-storage=postgresql://ann:s3cret@db/x?a=b", "--seed", "1"]
    assert studydb.redact_argv(argv) == ["--study-storage", "postgresql://ann@db/x", "--study-storage=postgresql://ann@db/x?a=b",
                                         "--seed", "1"]
    with pytest.raises(ConfigError, match="--study-storage postgresql://ann@db:port/x: not a database URL"):
        studydb.redact("postgresql://ann@db:port/x")


def test_a_folder_the_user_cannot_write_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; CLI_CASES' sqlite:////sys case covers root")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=rf"cannot write to the folder {folder} \(Permission denied\)"):
            studydb.open_storage(f"sqlite:///{folder}/study.db")
    finally:
        folder.chmod(0o755)


def test_a_new_sweep_never_joins_another_sweeps_study(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    optuna.create_study(study_name="other", storage=url)
    studydb.check_study(url, "mine", resume=False)  # another name: fine
    with pytest.raises(ConfigError, match="already holds a study named 'other' .* --name other --resume"):
        studydb.check_study(url, "other", resume=False)
    studydb.check_study(url, "other", resume=True)
    with pytest.raises(ConfigError, match="--resume: .* holds no study named 'mine'"):
        studydb.check_study(url, "mine", resume=True)


# ----------------------------------------------------------------------------- the mirror


def _row(status, best, epochs, reason=""):
    return {"status": status, "best_val_dice": best, "epochs_run": epochs, "failure_reason": reason,
            "node_id": "node-a", "wall_time_s": 12.5}


def test_each_trials_csv_status_becomes_its_optuna_state(tmp_path):
    storage = studydb.open_storage(f"sqlite:///{tmp_path}/study.db")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    cases = {  # status, best, epochs -> state, value
        "done": (_row("COMPLETED", 0.61, 3), "COMPLETE", 0.61),
        "asha": (_row("STOPPED_EARLY", 0.32, 1), "PRUNED", 0.32),
        "nan": (_row("FAILED", 0.0, 2, "training loss became non-finite (lr 0.1)"), "FAIL", None),
        "crash": (_row("ERROR", None, 1, "RuntimeError: boom"), "FAIL", None),
        "inf": (_row("COMPLETED", float("inf"), 3), "FAIL", None),
        "live": (_row("INTERRUPTED", 0.4, 1), "RUNNING", None),
    }
    for name, (row, _, _) in cases.items():
        trial = study.ask()
        trial.set_user_attr(studydb.TUNE_ID_ATTR, name)
        for epoch in range(1, row["epochs_run"] + 1):
            studydb.record_epoch(storage, trial._trial_id, epoch, 0.1 * epoch)
        studydb.record_end(study, storage, trial._trial_id, row, checkpoint_path=f"/ckpt/{name}")
    for name, (row, state, value) in cases.items():
        trial = studydb.find_trial(study, name)
        assert (trial.state.name, trial.value) == (state, pytest.approx(value) if value is not None else None), name
        if state != "RUNNING":
            assert trial.user_attrs["status"] == row["status"] and trial.user_attrs["checkpoint_path"] == f"/ckpt/{name}"
            assert trial.user_attrs["node_id"] == "node-a" and trial.user_attrs["wall_time_s"] == 12.5
    assert studydb.find_trial(study, "asha").intermediate_values == {1: pytest.approx(0.32)}  # ASHA's last epoch
    assert studydb.find_trial(study, "done").intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert studydb.find_trial(study, "nan").user_attrs["failure_reason"].startswith("training loss became non-finite")
    assert studydb.find_trial(study, "inf").user_attrs["failure_reason"] == "best_val_dice is not a finite number (inf)"
    assert "failure_reason" not in studydb.find_trial(study, "done").user_attrs


def _searcher(url, name="sweep"):
    from search.studysearch import StudySearch

    space = SearchSpace(resize_choices=[64])
    return StudySearch(storage_url=url, study_name=name, space=define_by_run(space), metric="best_val_dice", mode="max",
                       sampler=optuna.samplers.RandomSampler(seed=0))


def test_resume_fails_only_the_study_trials_the_restored_experiment_does_not_hold(tmp_path):
    """Tune's experiment snapshot, the searcher's and the search generator's are separate files,
    written and then copied to the storage one after another; a driver killed part way can leave the
    searcher's a trial ahead of the experiment's (what CI once hit: t3 below was live for the
    searcher, unknown to Tune, and stayed RUNNING for ever). So the ghosts are decided from the
    trials Tune restored, on the first step, before any new trial is asked for."""
    from types import SimpleNamespace

    from search.studysearch import StudyCallback

    url = f"sqlite:///{tmp_path}/study.db"
    searcher = _searcher(url)
    start_pickle = pickle.dumps(searcher)  # like tuner.pkl
    for tune_id in ("t0", "t1", "t2"):
        searcher.suggest(tune_id)
    storage = searcher._storage
    studydb.record_end(searcher._ot_study, storage, searcher._ot_trials["t0"]._trial_id, _row("COMPLETED", 0.5, 2))
    searcher.on_trial_complete("t0", {"best_val_dice": 0.5})
    searcher.suggest("t3")
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # the searcher's snapshot has t3 ...
    restored_trials = [SimpleNamespace(trial_id=tid) for tid in ("t0", "t1", "t2")]  # ... Tune's does not

    restored = pickle.loads(start_pickle)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert set(restored._ot_trials) == {"t1", "t2", "t3"}  # tied to the same Optuna trials
    callback = pickle.loads(pickle.dumps(StudyCallback("sweep", url, max_epochs=2, metric="best_val_dice")))
    callback.on_step_begin(0, restored_trials)
    restored.suggest("t4")  # Tune's next trial, after the first step's check
    callback.on_step_begin(1, [*restored_trials, SimpleNamespace(trial_id="t4")])
    states = {t.user_attrs[studydb.TUNE_ID_ATTR]: t.state.name for t in restored._ot_study.trials}
    assert states == {"t0": "COMPLETE", "t1": "RUNNING", "t2": "RUNNING", "t3": "FAIL", "t4": "RUNNING"}
    assert studydb.find_trial(restored._ot_study, "t3").user_attrs["failure_reason"] == studydb.STALE_REASON
    assert [t.number for t in restored._ot_study.trials] == [0, 1, 2, 3, 4]  # nothing duplicated
    assert b"RDBStorage" not in pickle.dumps(restored) and b"_ot_study" in pickle.dumps(restored)


# ----------------------------------------------------------------------------- a real sweep's study


def _study_of(run_dir):
    return optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.slow
def test_the_study_mirrors_the_finished_sweep(finished_sweep):
    run_dir, _ = finished_sweep
    table = pd.read_csv(run_dir / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    trials = {t.user_attrs[studydb.TUNE_ID_ATTR]: t for t in _study_of(run_dir).trials}
    assert set(trials) == set(table.index) and len(trials) == len(table)  # one Optuna trial per Tune trial
    for tune_id, trial in trials.items():
        row = table.loc[tune_id]
        assert trial.state.name == studydb.STATES[row["status"]] and trial.value == pytest.approx(row["best_val_dice"])
        assert trial.user_attrs["trial_name"] == f"trial_{row['trial_index']:03d}" and trial.user_attrs["status"] == row["status"]
        assert trial.user_attrs["node_id"] == row["node_id"] and trial.user_attrs["wall_time_s"] > 0
        assert Path(trial.user_attrs["checkpoint_path"]).parent.name == row["trial_dir"]
        epochs = [json.loads(line) for line in (run_dir / "tune" / row["trial_dir"] / "result.json").read_text().splitlines()]
        assert trial.intermediate_values == pytest.approx({r["epoch"]: r["best_val_dice"] for r in epochs})
        assert trial.params == pytest.approx({k: v for k, v in row.items() if k in trial.params})
    assert sorted(t.state.name for t in trials.values()) == ["COMPLETE"] * 3 + ["PRUNED"] * 3  # conftest.SIX_POINTS
    sweep = json.loads((run_dir / "sweep.json").read_text())
    assert sweep["study"]["storage"] == f"sqlite:///{run_dir / 'study.db'}" and sweep["study"]["study_name"] == "six"
    assert "ranked below every COMPLETE trial" in sweep["study"]["pruned_trials"] and sweep["sampler"]["name"] == "TPESampler"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout_s: float):
    """GET ``url`` as JSON, retrying until the server answers or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_optuna_dashboard_serves_the_sweeps_study(finished_sweep, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is the [dashboard] extra")
    run_dir, _ = finished_sweep
    port = _free_port()
    binary = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or "optuna-dashboard"
    with open(tmp_path / "dashboard.log", "w") as log:
        server = subprocess.Popen([binary, f"sqlite:///{run_dir / 'study.db'}", "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=log)
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", timeout_s=60)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["six"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout_s=10)
    finally:
        server.terminate()
        server.wait(timeout=30)
    table = pd.read_csv(run_dir / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    seen = {}
    for trial in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        seen[attrs[studydb.TUNE_ID_ATTR]] = (trial["state"].upper(), trial["values"][0])
    expected = {tid: (studydb.STATES[row["status"]], pytest.approx(row["best_val_dice"])) for tid, row in table.iterrows()}
    assert seen == expected


# ----------------------------------------------------------------------------- the sampler benchmark


def test_sampler_benchmark_counts_the_best_in_proposal_order_on_a_seeded_part_of_the_data(synthetic_dir, tmp_path):
    from search.bench_samplers import best_after, coco_fraction
    from tumorseg.data import DataOptions, open_dataset

    table = pd.DataFrame({"trial_index": [2, 0, 1, 3, 4], "best_val_dice": [0.5, 0.2, None, 0.4, 0.7]})  # None: failed
    assert best_after(table, [1, 2, 3, 4, 12]) == {1: 0.2, 2: 0.2, 3: 0.5, 4: 0.5, 12: 0.7}
    part = coco_fraction(synthetic_dir, tmp_path, 0.25)
    assert coco_fraction(synthetic_dir, tmp_path, 0.25) == part  # again: the same part
    sizes = {name: len(split) for name, split in open_dataset(part, DataOptions()).splits.items()}
    assert sizes == {"train": 24, "valid": 6, "test": 4}  # a quarter of 96 / 24 / 16
    for split in ("train", "valid"):
        coco = json.loads((part / split / "_annotations.coco.json").read_text())
        assert {a["image_id"] for a in coco["annotations"]} <= {i["id"] for i in coco["images"]}
        assert all((part / split / i["file_name"]).is_symlink() for i in coco["images"])
