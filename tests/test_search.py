"""The sweep: search space, CLI validation, debug mode, a real ASHA sweep, retrain, resume."""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pandas as pd
import pytest

import conftest
from conftest import ROOT, run_cli, sweep_args
from search.space import LOSS_PARAMS, SearchSpace, applicable_params, define_by_run, fit_to_budget, seed_point
from tumorseg.errors import ConfigError

# ----------------------------------------------------------------------------- the space


def test_conditional_parameters_only_where_they_apply():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = define_by_run(SearchSpace())
    seen = set()
    for _ in range(60):
        trial = study.ask()
        define(trial)
        loss_type = trial.params["loss_type"]
        seen.add(loss_type)
        conditional = set(trial.params) - {"resize_px", "loss_type", "lr", "warmup_epochs", "weight_decay"}
        assert conditional == set(LOSS_PARAMS[loss_type])
        study.tell(trial, 0.0)
    assert seen == {"dice", "dice_bce", "dice_focal"}


def test_seed_point_fits_the_space_and_says_what_moved():
    point, notes = seed_point(SearchSpace())
    assert point == {"resize_px": 256, "loss_type": "dice_bce", "dice_weight": 0.75, "bce_weight": 1.25,
                     "lr": 1e-4, "warmup_epochs": 2, "weight_decay": 0.01}
    assert notes == []
    point, notes = seed_point(SearchSpace(resize_choices=[96, 128]))
    assert point["resize_px"] == 128 and "resize_px 256 is not among [96, 128]: using 128" in notes[0]


def test_space_file_typo_and_bad_ranges(tmp_path):
    (tmp_path / "space.json").write_text(json.dumps({"lr_rnage": [1e-4, 1e-3]}))
    with pytest.raises(ConfigError, match="unknown search-space name.*lr_rnage"):
        SearchSpace.from_file(tmp_path / "space.json")
    (tmp_path / "space.yaml").write_text("resize_choices: [96, 128]\nlr_range: [1.0e-4, 1.0e-3]\n")
    assert SearchSpace.from_file(tmp_path / "space.yaml").resize_choices == [96, 128]
    with pytest.raises(ConfigError, match="lr_range: low 0.1 > high 0.01"):
        SearchSpace(lr_range=(0.1, 0.01))


def test_registry_defines_each_parameter_once():
    from search.space import PARAMS, all_distributions, applicable_params
    from tumorseg.config import TrainConfig

    assert [p.name for p in PARAMS if not p.optional] == list(all_distributions(SearchSpace()))  # one choice: fixed
    everything = SearchSpace(archs=["Unet", "FPN"], encoders=["resnet18", "mobilenet_v2"], batch_sizes=[8, 16], aug_strengths=[0, 1])
    assert [p.name for p in PARAMS] == list(all_distributions(everything))
    assert {p.name for p in PARAMS} <= set(TrainConfig().to_dict())
    # a CSV row: floats for ints, values of other loss types present; typed and filtered like a sampled point
    row = {"resize_px": 128.0, "loss_type": "dice_focal", "dice_weight": 1.0, "bce_weight": 0.5, "focal_weight": 2.0,
           "focal_gamma": 2.5, "lr": 1e-3, "warmup_epochs": 1.0, "weight_decay": float("nan")}
    params = applicable_params(row)
    assert params == {"resize_px": 128, "loss_type": "dice_focal", "dice_weight": 1.0, "focal_weight": 2.0,
                      "focal_gamma": 2.5, "lr": 1e-3, "warmup_epochs": 1}
    assert type(params["resize_px"]) is int and type(params["warmup_epochs"]) is int


def test_seeded_tpe_samples_the_same_points_through_the_registry():
    """suggest() samples in the registry's order; a seeded study is reproducible point by point."""
    def points(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
        out = []
        for i in range(8):
            trial = study.ask()
            define_by_run(SearchSpace())(trial)
            study.tell(trial, float(i % 3))
            out.append(trial.params)
        return out

    assert points(3) == points(3)


def test_warmup_range_fits_the_budget_and_explicit_conflicts_are_refused():
    space, notes = fit_to_budget(SearchSpace(), epochs=4, grace_period=2, explicit=False)
    assert space.warmup_epochs_range == (0, 2) and "narrowed to 0-2" in notes[0]
    space, notes = fit_to_budget(SearchSpace(), epochs=3, grace_period=None, explicit=False)  # debug: no ASHA
    assert space.warmup_epochs_range == (0, 2) and "within --epochs 3" in notes[0]
    assert fit_to_budget(SearchSpace(), epochs=20, grace_period=5, explicit=False) == (SearchSpace(), [])
    with pytest.raises(ConfigError, match="--warmup-epochs-range 0,5: a warmup of 5 epochs never ends within --epochs 4"):
        fit_to_budget(SearchSpace(), epochs=4, grace_period=2, explicit=True)
    space, notes = fit_to_budget(SearchSpace(warmup_epochs_range=(0, 3)), epochs=8, grace_period=2, explicit=True)
    assert space.warmup_epochs_range == (0, 3) and notes[0].startswith("warning: warmups of up to 3 epochs")


def test_tpe_start_up_is_sized_to_the_sweep():
    from search.rundir import SweepSettings
    from search.tuner import sampler_settings

    small, large = sampler_settings(SweepSettings(name="a", num_samples=12)), sampler_settings(SweepSettings(name="b", num_samples=200))
    assert small["n_startup_trials"] == 3 and large["n_startup_trials"] == 10  # Optuna's default is 10 at any size
    assert small["constant_liar"] and small["multivariate"]


def test_asha_defaults_reach_the_scheduler_and_narrow_the_warmup():
    """The measured defaults (grace 1, rf 2, this epoch's Dice; README's ASHA yield table) and the flag."""
    from search.cli import build_parser, settings_from_args
    from search.tuner import make_scheduler

    settings, space, _, notes = settings_from_args(build_parser().parse_args(["--epochs", "4", "--encoder-weights", "none"]))
    scheduler = make_scheduler(settings)
    rungs = sorted(epoch for epoch, _ in scheduler._brackets[0]._rungs)  # Ray keeps no grace period attribute
    assert (rungs, scheduler._reduction_factor, scheduler._metric) == ([1, 2, 4], 2, "val_dice")
    assert space.warmup_epochs_range == (0, 1) and "by the ASHA --grace-period 1" in notes[0]
    args = build_parser().parse_args(["--epochs", "4", "--rung-metric", "best_val_dice", "--grace-period", "2",
                                      "--encoder-weights", "none"])
    scheduler = make_scheduler(settings_from_args(args)[0])
    rungs = sorted(epoch for epoch, _ in scheduler._brackets[0]._rungs)
    assert (rungs, scheduler._reduction_factor, scheduler._metric) == ([2, 4], 2, "best_val_dice")


def test_trial_resources_come_from_the_clusters_nodes_not_the_driver():
    from search.cluster import concurrent_trials, default_cpus_per_trial
    from search.rundir import SweepSettings

    head, gpu_node = {"CPU": 4}, {"CPU": 32, "GPU": 4}  # a KubeRay head without GPUs, one GPU worker
    assert default_cpus_per_trial([head, gpu_node], gpus_per_trial=1) == 8
    assert default_cpus_per_trial([head, gpu_node, {"CPU": 16, "GPU": 4}], gpus_per_trial=2) == 8  # fits every GPU node
    assert default_cpus_per_trial([head, gpu_node], gpus_per_trial=0) == 1
    settings = SweepSettings(name="x", gpus=4, gpus_per_trial=1, cpus_per_trial=1)
    assert concurrent_trials(settings, total_cpus=2, total_gpus=4) == (2, "CPUs")
    assert concurrent_trials(settings, total_cpus=36, total_gpus=4) == (4, "GPUs")


def test_ddp_backend_is_chosen_from_the_workers_devices():
    from search.trainable import backend_for

    assert backend_for([True, True]) == "nccl"  # GPU workers, whatever the driver has
    assert backend_for([False, False]) == "gloo"  # logical GPUs on CPU machines
    assert backend_for([True, False]) == "gloo"


def test_report_and_retrain_import_without_ray():
    code = "import sys, search.report, search.retrain, search.trials, search.rundir; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ----------------------------------------------------------------------------- CLI validation


# (bad flags: the one table in test_bad_input.py)


def test_a_run_that_fails_on_its_data_does_not_claim_its_name(paths, tmp_path):
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)  # no annotation file, no valid/test split
    args = ["-m", "search.run", "--storage", str(tmp_path / "results"), "--name", "first", "--data", str(broken),
            "--no-dashboard", *conftest.TINY_SWEEP]
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "results" / "first" / "sweep.json").exists()
    retry = run_cli(*args, timeout=120)  # the same name again: the data error, not "already holds a sweep"
    assert retry.returncode == 2 and "already holds a sweep" not in retry.stderr and retry.stderr == proc.stderr


# ----------------------------------------------------------------------------- debug mode


def test_trials_table_keeps_all_digit_trial_ids_as_text(tmp_path):
    # Tune's trial ids are 8 hex digits, sometimes all decimal: pandas would read them as integers,
    # breaking best_config.json (int64 is not JSON) and the merge of rows by id on --resume
    from search.trials import COLUMNS, read_table, write_best_config, write_table

    rows = [dict.fromkeys(COLUMNS) | {"trial_index": i, "trial_id": tid, "status": "COMPLETED", "epochs_run": 2,
                                      "best_val_dice": dice, "resize_px": 64, "loss_type": "dice", "lr": 1e-3,
                                      "warmup_epochs": 0, "weight_decay": 0.01}
            for i, (tid, dice) in enumerate([("00012345", 0.5), ("24503672", 0.7)])]
    write_table(rows, tmp_path / "trials.csv")
    assert list(read_table(tmp_path)["trial_id"]) == ["00012345", "24503672"]
    best = write_best_config(tmp_path, {"epochs": 2, "encoder_weights": "none"})
    assert best["trial_id"] == "24503672"
    assert json.loads((tmp_path / "best_config.json").read_text())["trial_id"] == "24503672"


@pytest.mark.slow
def test_debug_mode_runs_one_trial_without_ray(paths, tmp_path):
    code = (
        "import sys; from search.run import main; "
        f"main(['--debug', '--data', {str(paths['data'])!r}, '--storage', {str(tmp_path)!r}, '--epochs', '1', "
        "'--resize-choices', '64', '--encoder-weights', 'none']); "
        "assert 'ray' not in sys.modules, 'debug mode imported ray'; print('NO_RAY')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "NO_RAY" in proc.stdout and "report: {'epoch': 1" in proc.stdout


# ----------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_sweep_stops_weak_trials_and_records_every_trial(finished_sweep):
    run_dir, proc = finished_sweep
    table = pd.read_csv(run_dir / "trials.csv").set_index("trial_index")
    assert len(table) == 6 and table["trial_id"].is_unique
    assert list(table.index) == list(range(6))
    for index, point in enumerate(conftest.SIX_POINTS):  # --points are evaluated first, in order
        assert applicable_params(table.loc[index].to_dict()) == pytest.approx(point)
    # the construction's premise (see conftest.SIX_POINTS): equal good scores, hopeless ones below them
    first_epoch = {i: _results(run_dir, table.loc[i, "trial_dir"])[0]["best_val_dice"] for i in range(6)}
    assert first_epoch[0] == first_epoch[1] == first_epoch[2], first_epoch
    assert max(first_epoch[i] for i in (3, 4, 5)) < first_epoch[0], first_epoch
    # ASHA stopped exactly the hopeless trials, at its first rung; the good ones ran every epoch
    assert list(table["status"]) == ["COMPLETED"] * 3 + ["STOPPED_EARLY"] * 3
    assert list(table["epochs_run"]) == [3, 3, 3, 1, 1, 1]
    assert set(table["gpu_ids"].astype(str)) == {"-1", "-2"}  # two logical GPUs, one per trial (conftest.NO_CUDA)
    assert table["node_id"].notna().all() and (table["wall_time_s"] > 0).all()
    assert "but this machine sees 0 CUDA device(s)" in proc.stderr and "gets 2 logical GPU(s)" in proc.stderr


def _results(run_dir, trial_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tune" / trial_dir / "result.json").read_text().splitlines()]


def test_seed_recipe_is_the_first_point_unless_points_are_given():
    from search.rundir import SweepSettings
    from search.tuner import make_searcher

    space, _ = fit_to_budget(SearchSpace(resize_choices=[64], lr_range=(1e-3, 5e-3)), epochs=3, grace_period=1, explicit=False)
    point, _ = seed_point(space)
    assert point["warmup_epochs"] == 1 and point["lr"] == 1e-3  # fitted to the grace period and the range
    settings = SweepSettings(name="x", num_samples=6, epochs=3, grace_period=1, seed=1)
    searcher = make_searcher(settings, space, max_concurrent=2)
    assert searcher.suggest("t0") == point
    assert searcher.suggest("t1") != point  # then TPE's own start-up points
    points = [dict(point, lr=2e-3), dict(point, lr=4e-3)]
    searcher = make_searcher(dataclasses.replace(settings, points=points), space, max_concurrent=2)
    assert [searcher.suggest("t0"), searcher.suggest("t1")] == points


@pytest.mark.slow
def test_best_config_retrained_and_scored_once_on_test(finished_sweep):
    run_dir, _ = finished_sweep
    table = pd.read_csv(run_dir / "trials.csv")
    best = json.loads((run_dir / "best_config.json").read_text())
    assert best["best_val_dice"] == pytest.approx(table["best_val_dice"].max())
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final["epochs"] == {"trials": 3, "final": 1}  # --final-epochs, not the trials' --epochs
    for recipe in ("best", "seed_recipe"):
        assert set(final[recipe]["test"]) >= {"dice", "f1", "precision", "recall"}
        assert final[recipe]["epochs"] == 1 and len(final[recipe]["seeds"]) == 1
        assert final[recipe]["runs"] == [f"{recipe}/{final[recipe]['key']}/seed0"]
        assert (run_dir / "final" / final[recipe]["runs"][0] / "model.pt").is_file()
        assert set(final[recipe]["ensemble_postprocessed"]["test"]) >= {"dice", "f1", "precision", "recall"}
    assert final["best"]["params"] == best["params"]
    assert any("resize_px 256 is not among [64]" in n for n in final["notes"])
    for name in ("model.pt", "model/member0.pt", "postprocess.json", "predictions.png", "overlay_best.png", "overlay_worst.png"):
        assert (run_dir / "final" / name).is_file()
    assert (run_dir / "report.html").is_file()
    # Ray's experiment folder holds one trial folder per trial; every trial finished, so none keeps a
    # checkpoint (deleted once its end is recorded, search.checkpoints.RecordTrialEnds)
    trial_dirs = sorted((run_dir / "tune").glob("trial_*"))
    assert len(trial_dirs) == 6
    assert not any(list(d.glob("checkpoint_*")) for d in trial_dirs)


@pytest.mark.slow
def test_same_name_without_resume_is_refused(finished_sweep, paths, tmp_path):
    proc = run_cli(*sweep_args(paths, tmp_path, "six"), timeout=60)
    assert proc.returncode == 2
    assert "already holds a sweep; continue it with --name six --resume" in proc.stderr


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_refuses_flags_that_would_change_the_sweep(finished_sweep, paths, tmp_path):
    proc = run_cli(*sweep_args(paths, tmp_path, "six", "--resume", "--num-samples", "9", "--epochs", "3"), timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # --epochs 3 is the sweep's own value (fine); the sweep's --lr-range, given again by sweep_args
    # with another value, is a change too
    assert "--resume continues the sweep as it was created, so --lr-range, --num-samples cannot change" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished_trials(run_dir):
    path = run_dir / "trials.csv"
    if not path.is_file():
        return pd.DataFrame()
    table = pd.read_csv(path)
    return table[table["status"].isin(["COMPLETED", "STOPPED_EARLY"])]


def _snapshot_checkpoints(run_dir) -> dict:
    """Trial folder -> the checkpoint Tune's latest experiment snapshot names, for its unfinished trials
    whose named checkpoint is their first epoch's (Ray's own format, read as Ray reads it)."""
    import pickle

    snapshots = sorted((run_dir / "tune").glob("experiment_state-*.json"))
    try:
        state = json.loads(snapshots[-1].read_text()) if snapshots else {"trial_data": []}
    except ValueError:  # being written
        return {}
    named = {}
    for trial_json, metadata_json in state["trial_data"]:
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        latest = pickle.loads(bytes.fromhex(metadata["checkpoint_manager"]["value"])).latest_checkpoint_result
        if trial["status"] in ("RUNNING", "PENDING", "PAUSED") and latest is not None and os.path.isdir(latest.checkpoint.path) \
                and metadata["last_result"].get("epoch", 0) < 2:  # two epochs from its end: still unfinished at the kill
            named[os.path.basename(os.path.dirname(latest.checkpoint.path))] = latest.checkpoint.path
    return named


def _forget_the_end(run_dir, finished_ids) -> str:
    """Make Tune's newest snapshot show one of the finished trials still running at its first epoch, as a
    snapshot taken before it ended does (Tune writes them only now and then); its trial name."""
    path = sorted((run_dir / "tune").glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    for i, (trial_json, metadata_json) in enumerate(state["trial_data"]):
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        if trial["trial_id"] in {str(i) for i in finished_ids}:  # pandas reads all-digit ids as numbers
            folder = next((run_dir / "tune").glob(f"trial_*_{trial['trial_id']}"))
            trial["status"] = "RUNNING"
            metadata["last_result"] = json.loads((folder / "result.json").read_text().splitlines()[0])
            state["trial_data"][i] = [json.dumps(trial), json.dumps(metadata)]
            path.write_text(json.dumps(state))
            return "_".join(folder.name.split("_")[:2])
    raise AssertionError(f"no finished trial in {path.name}")


@pytest.mark.slow
def test_killed_driver_then_resume_keeps_finished_trials(paths, ray_tmp, tmp_path):
    port = _free_port()
    args = sweep_args(paths, ray_tmp, "resumable", "--gpus", "2", "--num-samples", "6", "--epochs", "3", "--grace-period", "3")
    mlflow = importlib.util.find_spec("mlflow") is not None
    if mlflow:  # MLflow runs survive the kill too: no run and no epoch logged twice
        args += ["--mlflow", str(tmp_path / "mlflow")]
    args[args.index("--no-dashboard")] = "--dashboard"
    args += ["--dashboard-port", str(port)]
    # Tune's experiment snapshot every second (default: every 10 s or so, the cost of one spread out), so
    # one soon names a trial's first checkpoint while the trial runs on
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True, env=env)
    run_dir = paths["storage"] / "resumable"
    dashboard_ok = False
    try:
        deadline = time.monotonic() + 600
        while len(_finished_trials(run_dir)) < 2 or not _snapshot_checkpoints(run_dir):
            assert driver.poll() is None and time.monotonic() < deadline, \
                "sweep ended or hung before two trials finished and Tune saved another one's checkpoint"
            if not dashboard_ok:
                try:  # the dashboard answers while the sweep runs
                    dashboard_ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
                except OSError:
                    pass
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the whole driver process group, like a lost ssh session
        driver.wait()
    assert dashboard_ok
    # the kill a moment after Tune registered a trial's next checkpoint and deleted the one its last
    # snapshot names (CI hit this: the resumed trial ended ERROR); here made certain
    candidates = _snapshot_checkpoints(run_dir)
    assert candidates, "the last snapshot names no first-epoch checkpoint of an unfinished trial"
    trial_dir, named = sorted(candidates.items())[0]
    index = int(named.rsplit("_", 1)[1])
    following = f"{named.rsplit('_', 1)[0]}_{index + 1:06d}"
    if os.path.isdir(following):  # the trial had written the next one, not yet registered: Tune would delete this one
        shutil.rmtree(named)
    else:
        os.rename(named, following)
    before = _finished_trials(run_dir).set_index("trial_id")
    lines_before = {tid: (run_dir / "tune" / row["trial_dir"] / "result.json").read_text().count("\n") for tid, row in before.iterrows()}
    for tid, row in before.iterrows():  # each finished trial's results are whole on the storage with its end
        end = json.loads((run_dir / "tune" / row["trial_dir"] / "end.json").read_text())
        assert lines_before[tid] == end["epoch"] == row["epochs_run"]
    forgotten = _forget_the_end(run_dir, set(before.index))  # finished after Tune's last snapshot

    proc = run_cli(*sweep_args(paths, ray_tmp, "resumable", "--resume", "--no-retrain"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{forgotten}: it had finished before the driver stopped (end.json)" in proc.stderr
    after = pd.read_csv(run_dir / "trials.csv")
    assert len(after) == 6 and after["trial_id"].is_unique  # nothing duplicated, nothing lost
    assert set(after["status"]) == {"COMPLETED"}
    trial_name = "_".join(trial_dir.split("_")[:2])  # trial_003_<id> -> trial_003
    assert f"{trial_name}: its saved checkpoint_{index:06d} was replaced" in proc.stderr
    assert f"continues from checkpoint_{index + 1:06d}" in proc.stderr
    for tid, row in before.iterrows():  # finished trials were not rerun
        path = run_dir / "tune" / row["trial_dir"] / "result.json"
        assert path.read_text().count("\n") == lines_before[tid]
        assert after.set_index("trial_id").loc[tid, "best_val_dice"] == pytest.approx(row["best_val_dice"])
    # the same study, continued: each trial of trials.csv once and COMPLETE; anything else a FAIL ghost
    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{run_dir / 'study.db'}")
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    ids = pd.read_csv(run_dir / "trials.csv", dtype={"trial_id": str})["trial_id"]
    assert len(states) == len(study.trials) and {tid: states[tid] for tid in ids} == dict.fromkeys(ids, "COMPLETE")
    assert set(states.values()) <= {"COMPLETE", "FAIL"}
    if mlflow:
        _check_mlflow_after_resume(run_dir, after)


def _check_mlflow_after_resume(run_dir, table) -> None:
    from search import tracking

    info = json.loads((run_dir / "sweep.json").read_text())["mlflow"]  # recorded before the kill, reused
    client = tracking.client(info["uri"])
    assert len(client.search_runs([info["experiment_id"]], "attributes.run_name = 'resumable'")) == 1
    children = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
    assert sorted(r.data.tags[tracking.TRIAL_ID_TAG] for r in children) == sorted(table["trial_id"])
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")]
        assert sorted(steps) == [1, 2, 3], (run.info.run_name, steps)
        assert (run.info.status, run.data.tags[tracking.STATUS_TAG]) == ("FINISHED", "COMPLETED")
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"


def test_resume_repair_takes_the_next_checkpoint_and_the_epoch_its_state_ends_at(tmp_path):
    """Tune's snapshot names checkpoint_000001, deleted since; 000002 (complete) and 000003 (cut off by
    the kill: no state file) are on disk. The trial continues from 000002 with that state's last epoch
    as its last result (result.json reaches the storage later, so it has no line for it), and its next
    checkpoint is numbered after every folder there."""
    from types import SimpleNamespace

    import pyarrow.fs
    import torch
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    from search.checkpoints import continue_from_saved_checkpoint
    from search.trainable import STATE_FILE

    trial_dir = tmp_path / "trial_000_abc"
    (trial_dir / "checkpoint_000002").mkdir(parents=True)
    (trial_dir / "checkpoint_000003").mkdir()
    torch.save({"epoch": 3, "history": [{"epoch": 2, "val_dice": 0.4}, {"epoch": 3, "val_dice": 0.5, "best_val_dice": 0.5}]},
               trial_dir / "checkpoint_000002" / STATE_FILE)
    (trial_dir / "result.json").write_text(json.dumps({"epoch": 2, "checkpoint_dir_name": "checkpoint_000001"}) + "\n")
    filesystem = pyarrow.fs.LocalFileSystem()
    named = _TrainingResult(checkpoint=Checkpoint(str(trial_dir / "checkpoint_000001"), filesystem), metrics={"epoch": 2})
    manager = SimpleNamespace(_checkpoint_results=[named], _latest_checkpoint_result=named)
    calls = []
    trial = SimpleNamespace(latest_checkpoint_result=named, run_metadata=SimpleNamespace(
        checkpoint_manager=manager, invalidate_cache=lambda: calls.append("metadata")),
        storage=SimpleNamespace(current_checkpoint_index=1), invalidate_json_state=lambda: calls.append("trial"))

    assert continue_from_saved_checkpoint(trial) == ("checkpoint_000001", "checkpoint_000002")
    mended = manager._latest_checkpoint_result
    assert manager._checkpoint_results == [mended] and mended.checkpoint.path == str(trial_dir / "checkpoint_000002")
    assert mended.metrics == {"epoch": 3, "val_dice": 0.5, "best_val_dice": 0.5}
    assert trial.storage.current_checkpoint_index == 3 and sorted(calls) == ["metadata", "trial"]
    trial.latest_checkpoint_result = mended
    assert continue_from_saved_checkpoint(trial) is None  # nothing left to mend


@pytest.mark.slow
def test_trials_use_the_drivers_encoder_weights_and_never_fetch(paths, tmp_path, monkeypatch):
    """The driver resolves weights once; a trial asked for ImageNet weights on an offline node
    trains from the tensors it was handed (the hub is never consulted)."""
    from search.trainable import load_search_data, run_trial
    from tumorseg.model import create_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))  # nothing cached, offline
    donor = create_model(None).encoder.state_dict()
    reports = []
    params = {"resize_px": 64, "loss_type": "dice", "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 0.01}
    run_trial(params, base={"epochs": 1, "encoder_weights": "imagenet", "num_workers": 0, "batch_size": 8},
              data=load_search_data(paths["data"], [64]), report=lambda m, c: reports.append((m, c())),
              encoder_states={"resnet18": donor})
    (metrics, state), = reports  # resolving "imagenet" here would have raised: offline, empty cache
    assert metrics["epoch"] == 1 and "failure_reason" not in metrics and state["epoch"] == 1
    # its cost: 14.32 M parameters; GFLOPs per 64 px image (a sixteenth of those at 256 px)
    assert metrics["params_m"] == pytest.approx(14.321937) and 0.5 < metrics["gflops"] < 0.8 and metrics["train_images_per_s"] > 0
