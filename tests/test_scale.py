"""Thousands of trials: what the driver does per trial stays bounded (issue 15).

The searcher's history window, checkpoints deleted once a trial is finished and recorded so,
trials.csv written at a bounded rate, a report that stays legible, and the --scale bench itself.
"""

import json
import shutil
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from conftest import run_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- the searcher's window


def _objective(trial) -> float:
    x = trial.suggest_float("x", -3, 3)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    y = trial.suggest_float("y", 0, 1) if kind == "a" else 0.5
    return -((x - 1) ** 2) - (y - 0.2) ** 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_windowed_tpe_proposes_exactly_what_tpe_does_while_the_study_fits_the_window():
    from search.sampler_window import WindowedSampler

    def tpe():
        return optuna.samplers.TPESampler(seed=3, n_startup_trials=5, multivariate=True, group=True, constant_liar=True)

    plain = optuna.create_study(direction="maximize", sampler=tpe())
    windowed = optuna.create_study(direction="maximize", sampler=WindowedSampler(tpe(), recent=40, best=8))
    plain.optimize(_objective, n_trials=30)
    windowed.optimize(_objective, n_trials=30)
    assert [t.params for t in windowed.trials] == [t.params for t in plain.trials]


class SeenTrials(optuna.samplers.RandomSampler):
    """Records which finished trials (and which trials at all) the sampler was shown at each proposal."""

    def __init__(self):
        super().__init__(seed=0)
        self.seen: list[set[int]] = []
        self.seen_all: list[set[int]] = []

    def sample_independent(self, study, trial, param_name, param_distribution):
        self.seen.append({t.number for t in study._get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))})
        self.seen_all.append({t.number for t in study.get_trials(deepcopy=False)})
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_windowed_sampler_shows_only_the_best_and_the_latest_trials():
    from search.sampler_window import WindowedSampler

    inner = SeenTrials()
    study = optuna.create_study(direction="maximize", sampler=WindowedSampler(inner, recent=5, best=2))
    values = [0.1, 0.9, 0.2, 0.8, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.1, 0.2]  # best: trial 1 (0.9), trial 3 (0.8)
    for value in values:
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, value)
    trial = study.ask()  # trial 12: the window is trials 8-11 (recent 5 = 8..12) and the best two
    trial.suggest_float("x", 0, 1)
    assert inner.seen[-1] == {1, 3, 8, 9, 10, 11}
    assert inner.seen[4] == {0, 1, 2, 3}  # trial 4: everything fits the window


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_tpe_reads_the_study_once_per_proposal_through_the_window():
    """TPE asks for the trials several times per proposal, and with the constant liar its asks reach
    the storage (on a database each re-reads every running trial); the window serves them from one
    read, whether or not the study fits it."""
    from search.sampler_window import WindowedSampler

    def tpe():
        return optuna.samplers.TPESampler(seed=3, n_startup_trials=5, multivariate=True, group=True, constant_liar=True)

    reads = {}
    for name, sampler in (("plain", tpe()), ("fits", WindowedSampler(tpe(), recent=100, best=4)),
                          ("cut", WindowedSampler(tpe(), recent=10, best=4))):
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(_objective, n_trials=20)
        calls, real = [], study._storage.get_all_trials
        study._storage.get_all_trials = lambda *a, **k: calls.append(1) or real(*a, **k)
        reads[name] = []
        for _ in range(3):
            calls.clear()
            trial = study.ask()
            value = _objective(trial)
            reads[name].append(len(calls))
            study.tell(trial, value)
    # Optuna's ask reads once (waiting trials); the sampler once through the window, 3 times without
    assert reads == {"plain": [4, 4, 4], "fits": [2, 2, 2], "cut": [2, 2, 2]}


def test_the_window_holds_tpes_best_pruned_trials_and_every_running_one():
    """ASHA stops most trials (PRUNED): TPE ranks COMPLETE ones first, then PRUNED by the last epoch
    reached and its value; an old trial still running stays visible to the constant liar."""
    from optuna.trial import TrialState

    from search.sampler_window import WindowedSampler

    inner = SeenTrials()
    study = optuna.create_study(direction="maximize", sampler=WindowedSampler(inner, recent=3, best=3))
    outcomes = [None, ("complete", 0.9), ("pruned", 4, 0.5), ("pruned", 1, 0.95), ("pruned", 4, 0.3)] + [("fail",)] * 5
    for outcome in outcomes:  # trial 0 is never told: still RUNNING
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        if outcome and outcome[0] == "complete":
            study.tell(trial, outcome[1])
        elif outcome and outcome[0] == "pruned":
            trial.report(outcome[2], outcome[1])
            study.tell(trial, state=TrialState.PRUNED)
        elif outcome:
            study.tell(trial, state=TrialState.FAIL)
    trial = study.ask()  # trial 10: recent = 8..10; best 3 = trial 1, then the pruned at step 4 (2, 4), not 3
    trial.suggest_float("x", 0, 1)
    assert inner.seen_all[-1] == {0, 1, 2, 4, 8, 9, 10}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_windowed_tpe_and_gp_propose_from_a_window_smaller_than_the_stored_study(tmp_path, name):
    """The cut path itself, with the real samplers as the sweep builds them, on a SQLite study."""
    from search.sampler_window import WindowedSampler

    inner = {"tpe": lambda: optuna.samplers.TPESampler(seed=0, n_startup_trials=3, multivariate=True, group=True, constant_liar=True),
             "gp": lambda: optuna.samplers.GPSampler(seed=0, n_startup_trials=3, deterministic_objective=False)}[name]()
    sizes = []
    original = inner.sample_relative

    def sample_relative(study, trial, search_space):
        sizes.append(len(study.get_trials(deepcopy=False)))
        return original(study, trial, search_space)

    inner.sample_relative = sample_relative
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'w.db'}", direction="maximize",
                                sampler=WindowedSampler(inner, recent=5, best=2))
    study.optimize(_objective, n_trials=24)
    assert len(study.trials) == 24 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert sizes[4] == 5 and max(sizes) == 7  # the whole study while it fits; then 5 latest (the asking one too) + 2 best
    assert study.best_value > -0.5  # still optimises: the optimum is 0 at x = 1, y = 0.2


def test_windowed_sampler_finds_the_best_in_a_stored_study_told_through_another_connection(tmp_path):
    """As in a sweep: StudySearch asks, StudyCallback tells through its own study object, so the
    sampler never sees ``after_trial``; the best trials still come from the database."""
    from search.sampler_window import WindowedSampler

    url = f"sqlite:///{tmp_path / 'study.db'}"
    inner = SeenTrials()
    asking = optuna.create_study(study_name="s", storage=url, direction="maximize", sampler=WindowedSampler(inner, recent=5, best=2))
    telling = optuna.load_study(study_name="s", storage=url)
    for value in [0.1, 0.9, 0.2, 0.8, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.1, 0.2]:
        trial = asking.ask()
        trial.suggest_float("x", 0, 1)
        telling.tell(trial.number, value)
    trial = asking.ask()
    trial.suggest_float("x", 0, 1)
    assert inner.seen[-1] == {1, 3, 8, 9, 10, 11}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("name", ["tpe", "gp", "random", "qmc"])
def test_tpe_and_gp_propose_from_the_window_and_every_sampler_pickles_with_the_stored_study(tmp_path, name):
    import pickle

    from search.rundir import SweepSettings
    from search.sampler_window import WindowedSampler
    from search.space import SearchSpace
    from search.tuner import HISTORY, METRIC, make_searcher, sampler_settings

    settings = SweepSettings(name="w", num_samples=20, sampler=name, seed=0)
    recorded = sampler_settings(settings)  # sweep.json's "sampler"
    searcher = make_searcher(settings, SearchSpace(), 2, f"sqlite:///{tmp_path / 'study.db'}")
    sampler = searcher.searcher._sampler
    if name in ("tpe", "gp"):  # a model of the history: windowed
        assert recorded["history"] == HISTORY == {"best": 32, "recent": 256}
        assert isinstance(sampler, WindowedSampler) and type(sampler.sampler).__name__ == recorded["name"]
        assert {"best": sampler.best, "recent": sampler.recent} == recorded["history"]
    else:  # no model: nothing to bound (QMC reads its space from the first finished trial)
        assert "history" not in recorded and type(sampler).__name__ == recorded["name"]
    searcher.set_search_properties(METRIC, "max", {})
    assert searcher.suggest("t0")
    restored = pickle.loads(pickle.dumps(searcher))  # as Tune saves it with each snapshot
    assert type(restored.searcher._sampler) is type(sampler) and restored.searcher._ot_study is not None
    assert restored.suggest("t1")


# ----------------------------------------------------------------------------- the driver's reads of the study


def _as_read(trials, finished_only=False) -> dict:
    return {t.number: (t.state, t.params, t.values, t.intermediate_values, t.user_attrs) for t in trials
            if t.state.is_finished() or not finished_only}


def test_the_drivers_connections_read_whole_only_the_trials_that_changed(tmp_path):
    """With trials running, Optuna's cache re-reads each of them whole on every read of the study; the
    driver's connections read whole only new trials, trials another connection finished, and trials
    written through themselves, and then hold what the database holds (a running trial's epochs
    written elsewhere excepted, as documented)."""
    from search.study import TUNE_ID_ATTR, find_trial, open_storage
    from search.study_cache import DeltaCachedStorage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    storage = DeltaCachedStorage(open_storage(url))
    asking = optuna.load_study(study_name="s", storage=storage)  # the searcher's side
    telling = optuna.load_study(study_name="s", storage=DeltaCachedStorage(open_storage(url)))  # StudyCallback's
    loaded, backend_read = [], storage._backend._get_trials

    def counted(*args, **kwargs):
        trials = backend_read(*args, **kwargs)
        loaded.append(sorted(t.number for t in trials))
        return trials

    storage._backend._get_trials = counted
    for i in range(6):  # proposals: each asks, samples and tags through the searcher's connection
        trial = asking.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr(TUNE_ID_ATTR, f"t{i}")
    assert find_trial(telling, "t5", states=(optuna.trial.TrialState.RUNNING,)).params.keys() == {"x"}
    asking.get_trials(deepcopy=False)
    loaded.clear()
    asking.get_trials(deepcopy=False)
    assert loaded == []  # six trials running, none changed: nothing read whole

    ids = {t.number: t._trial_id for t in telling.get_trials()}
    telling._storage.set_trial_intermediate_value(ids[2], 1, 0.3)  # an epoch of a trial that keeps running
    telling._storage.set_trial_intermediate_value(ids[3], 1, 0.4)
    telling.tell(3, state=optuna.trial.TrialState.PRUNED)  # ASHA stopped it after its epoch
    telling.tell(1, 0.9)
    asking.enqueue_trial({"x": 0.5})  # a --points trial: WAITING, then popped by the next ask
    telling.get_trials(deepcopy=False)  # the callback's side reads it WAITING
    trial = asking.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(TUNE_ID_ATTR, "t6")
    assert loaded[0] == [1, 3, 6]  # Optuna's read of WAITING trials at the ask: the two that ended, the queued one
    loaded.clear()
    seen = asking.get_trials(deepcopy=False)
    assert loaded == [[6]] and not storage._written_since_read  # read whole once more after its proposal
    database = optuna.load_study(study_name="s", storage=url).get_trials()
    assert _as_read(seen, finished_only=True) == _as_read(database, finished_only=True)
    assert {t.number: (t.state, t.params, t.user_attrs) for t in seen} == \
        {t.number: (t.state, t.params, t.user_attrs) for t in database}
    assert seen[3].state == optuna.trial.TrialState.PRUNED and seen[3].intermediate_values == {1: 0.4}
    assert seen[2].intermediate_values == {} and database[2].intermediate_values == {1: 0.3}  # as documented
    assert find_trial(telling, "t6", states=(optuna.trial.TrialState.RUNNING,)).params == {"x": 0.5}


def _proposals_through(tmp_path, cached: bool) -> list[dict]:
    """A small sweep's proposals (TPE with the constant liar, in a window smaller than the study),
    asked through one connection and told through another, as StudySearch and StudyCallback do."""
    import random

    from search.sampler_window import WindowedSampler
    from search.study import open_storage
    from search.study_cache import DeltaCachedStorage

    url = f"sqlite:///{tmp_path / f'cached-{cached}.db'}"
    connect = (lambda: DeltaCachedStorage(open_storage(url))) if cached else (lambda: open_storage(url))
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    tpe = optuna.samplers.TPESampler(seed=0, n_startup_trials=4, multivariate=True, group=True, constant_liar=True)
    asking = optuna.load_study(study_name="s", storage=connect(), sampler=WindowedSampler(tpe, recent=6, best=2))
    telling = optuna.load_study(study_name="s", storage=connect())
    rng, running, proposed = random.Random(0), [], []
    for _ in range(16):
        trial = asking.ask()
        _objective(trial)
        proposed.append(trial.params)
        running.append(trial)
        value = rng.random()
        telling._storage.set_trial_intermediate_value(trial._trial_id, 1, value)  # its first epoch
        if len(running) > 4:  # one ends: run out or stopped by ASHA
            ended = running.pop(rng.randrange(len(running)))
            state = optuna.trial.TrialState.PRUNED if rng.random() < 0.6 else optuna.trial.TrialState.COMPLETE
            telling.tell(ended.number, None if state == optuna.trial.TrialState.PRUNED else value, state=state)
    return proposed


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_study_cache_leaves_every_proposal_as_optunas_cache_makes_it(tmp_path):
    assert _proposals_through(tmp_path, cached=True) == _proposals_through(tmp_path, cached=False)


# ----------------------------------------------------------------------------- checkpoints of finished trials


def _trial_folder(root, name):
    trial = root / name
    for folder in ("checkpoint_000002", "checkpoint_000003", "train/checkpoint_000001"):
        (trial / folder).mkdir(parents=True)
        (trial / folder / "state.json").write_text("{}")
    (trial / "result.json").write_text('{"epoch": 3}\n')
    return trial


def _trial(folder, status="TERMINATED", last_result=None):
    """A Tune trial as much as RecordTrialEnds reads it, its folder on a file:// storage (the same pyarrow
    calls as s3://)."""
    from pyarrow.fs import LocalFileSystem

    manager = SimpleNamespace(_checkpoint_results=["named"], _latest_checkpoint_result="named")
    trial = FakeTrial(name=folder.name, status=status, path=str(folder), last_result=last_result or {},
                      local_path=str(folder.parent / "staging" / folder.name),  # the driver's, synced to the storage
                      storage=SimpleNamespace(storage_filesystem=LocalFileSystem()),
                      run_metadata=SimpleNamespace(checkpoint_manager=manager, invalidate_cache=lambda: None),
                      invalidate_json_state=lambda: None)
    trial.update_last_result = lambda result: setattr(trial, "last_result", result)
    return trial


def test_a_finished_trial_is_recorded_before_its_checkpoints_go_and_a_resume_keeps_it_finished(tmp_path, capsys):
    import numpy as np

    from search.checkpoints import RecordTrialEnds
    from search.rundir import read_trial_end

    a, b, c, d = (_trial_folder(tmp_path, f"trial_00{i}_{n}") for i, n in enumerate("abcd"))
    staged = tmp_path / "staging" / a.name  # Tune's logger writes here and syncs to the storage now and then
    staged.mkdir(parents=True)
    (staged / "result.json").write_text('{"epoch": 3}\n{"epoch": 4}\n')
    callback = RecordTrialEnds()
    end = {"epoch": 4, "best_val_dice": np.float32(0.25), "done": True}  # numpy, as a trial may report
    callback.on_trial_complete(0, [], _trial(a, last_result=end))
    callback.on_trial_complete(0, [], _trial(a, last_result={"epoch": 1}))  # ends again after a resume: kept
    callback.wait()
    assert read_trial_end(_trial(a).storage.storage_filesystem, str(a)) == {"epoch": 4, "best_val_dice": 0.25, "done": True}
    assert (a / "result.json").read_text() == '{"epoch": 3}\n{"epoch": 4}\n'  # whole on the storage with its end
    assert sorted(p.name for p in a.rglob("*")) == ["end.json", "result.json", "train"] and callback.deleted == 3
    shutil.rmtree(staged)
    RecordTrialEnds(delete_checkpoints=False).on_trial_complete(0, [], _trial(b, last_result={"epoch": 3}))  # --keep-checkpoints
    assert (b / "end.json").is_file() and (b / "checkpoint_000003").is_dir()

    # --resume, from a snapshot taken before a and b ended: both come back unfinished with an older result
    resumed = RecordTrialEnds()
    trials = [_trial(a, "PENDING", {"epoch": 1}), _trial(b, "PENDING", {"epoch": 1}), _trial(c, "PENDING", {"epoch": 1}),
              _trial(d, "TERMINATED", {"epoch": 3})]  # d: finished in the snapshot, killed before its deletion ran
    resumed.on_step_begin(0, trials)
    resumed.on_step_begin(1, trials)  # the first step only
    resumed.wait()
    assert [t.last_result for t in trials[:3]] == [{"epoch": 4, "best_val_dice": 0.25, "done": True}, {"epoch": 3}, {"epoch": 1}]
    managers = [t.run_metadata.checkpoint_manager for t in trials[:3]]
    assert [(m._checkpoint_results, m._latest_checkpoint_result) for m in managers] == [([], None), ([], None), (["named"], "named")]
    assert (c / "checkpoint_000003").is_dir() and not (c / "end.json").exists()  # c was running: it continues
    assert not list(d.glob("checkpoint_*")) and (b / "checkpoint_000003").is_dir()  # b's go when it ends again
    assert capsys.readouterr().err.count("it had finished before the driver stopped (end.json)") == 2
    # Tune's logger appends to the staged result.json and copies it over the storage's: fetched first
    assert (tmp_path / "staging" / a.name / "result.json").read_text() == '{"epoch": 3}\n{"epoch": 4}\n'
    assert not (tmp_path / "staging" / c.name).exists()

    (c / "end.json").mkdir()  # a storage that cannot be read: said, and Tune restores the trial as saved
    RecordTrialEnds().on_step_begin(0, [_trial(c, "PENDING", {"epoch": 1})])
    assert "trial_002_c: could not read its end.json (OSError: " in capsys.readouterr().err


def test_a_trial_whose_end_cannot_be_recorded_keeps_its_checkpoints(tmp_path, caplog):
    from search.checkpoints import RecordTrialEnds

    from search.rundir import read_trial_end

    folder = _trial_folder(tmp_path, "trial_000_a")
    trial = _trial(folder, last_result={"epoch": 2})
    (tmp_path / "a-file").write_text("")
    trial.path = str(tmp_path / "a-file")  # the storage refuses the write
    callback = RecordTrialEnds()
    callback.on_trial_complete(0, [], trial)
    callback.wait()
    assert "could not record its end" in caplog.text and (folder / "checkpoint_000003").is_dir()
    # a trial that failed in its first epoch may have no folder on the storage yet: made
    first = _trial(tmp_path / "trial_001_b", last_result={"epoch": 1, "failure_reason": "non-finite loss"})
    RecordTrialEnds().on_trial_complete(0, [], first)
    assert read_trial_end(first.storage.storage_filesystem, first.path)["failure_reason"] == "non-finite loss"


def test_a_resumed_trial_continues_from_the_oldest_newer_checkpoint_and_its_leftovers_go_when_it_finishes(tmp_path):
    """Tune keeps 2 checkpoints: the snapshot named checkpoint 2; 3 and 4 were registered since (2 deleted
    then), 5 may have been cut off by the kill. The trial continues from 3, numbers its next after 5, and
    once it has finished every checkpoint folder goes, those Tune no longer tracks (4, 5) too."""

    from ray.tune import Checkpoint

    from search.checkpoints import RecordTrialEnds, continue_from_saved_checkpoint
    from search.trainable import STATE_FILE

    trial_dir = tmp_path / "trial_000_a"
    for index in (3, 4, 5):
        (trial_dir / f"checkpoint_{index:06d}").mkdir(parents=True)
        (trial_dir / f"checkpoint_{index:06d}" / STATE_FILE).write_bytes(b"")  # held: its result.json line gives the metrics
    (trial_dir / "result.json").write_text("".join(json.dumps({"epoch": e, "checkpoint_dir_name": f"checkpoint_{e:06d}"}) + "\n"
                                                   for e in (2, 3, 4, 5)))
    manager = SimpleNamespace(_checkpoint_results=["named"], _latest_checkpoint_result="named")
    trial = FakeTrial(name="trial_000", latest_checkpoint_result=SimpleNamespace(checkpoint=Checkpoint((trial_dir / "checkpoint_000002").as_uri())),
                      run_metadata=SimpleNamespace(checkpoint_manager=manager, invalidate_cache=lambda: None),
                      storage=SimpleNamespace(current_checkpoint_index=2), invalidate_json_state=lambda: None)
    assert continue_from_saved_checkpoint(trial) == ("checkpoint_000002", "checkpoint_000003")
    mended = manager._latest_checkpoint_result
    assert manager._checkpoint_results == [mended] and mended.checkpoint.path.endswith("checkpoint_000003")
    assert mended.metrics["epoch"] == 3 and trial.storage.current_checkpoint_index == 5
    assert continue_from_saved_checkpoint(FakeTrial(name="t", latest_checkpoint_result=mended)) is None  # there: nothing to mend

    (trial_dir / "checkpoint_000006").mkdir()  # it ran on and finished
    trial.path, trial.last_result, trial.storage.storage_filesystem = str(trial_dir), {"epoch": 6}, mended.checkpoint.filesystem
    trial.local_path = str(tmp_path / "staging" / trial_dir.name)  # nothing staged: nothing to upload
    callback = RecordTrialEnds()
    callback.on_trial_complete(0, [trial], trial)
    callback.on_experiment_end([trial])
    assert not list(trial_dir.glob("checkpoint_*")) and callback.deleted == 4


def test_the_tuner_records_ends_first_and_mends_checkpoints(tmp_path):
    import dataclasses

    from search.rundir import SweepSettings
    from search.space import SearchSpace
    from search.tuner import make_tuner

    settings = SweepSettings(name="c", num_samples=4, storage=str(tmp_path))

    def callbacks(keep: bool, storage_url=None) -> list:
        tuner = make_tuner(dataclasses.replace(settings, keep_checkpoints=keep), SearchSpace(), lambda config: None, 2, [],
                           storage_url)
        return tuner._local_tuner._run_config.callbacks

    # the end on the storage before the study is told (a kill in between: the study is told on --resume)
    names = [type(c).__name__ for c in callbacks(False, f"sqlite:///{tmp_path / 'study.db'}")]
    assert names == ["RecordTrialEnds", "StudyCallback", "ContinueFromSavedCheckpoint"]
    assert callbacks(False)[0].delete_checkpoints and not callbacks(True)[0].delete_checkpoints  # --keep-checkpoints


# ----------------------------------------------------------------------------- trials.csv at a bounded rate


class FakeTrial(SimpleNamespace):
    def __str__(self):
        return self.name


def test_trials_table_is_written_from_tunes_loop_at_most_every_interval_with_the_latest_result(tmp_path):
    from search.callbacks import TrialsTableCallback

    table = TrialsTableCallback(tmp_path, max_epochs=4, min_interval_s=3600)
    config = {"resize_px": 64, "loss_type": "dice", "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 1e-4}
    trial = FakeTrial(name="trial_000", trial_id="a0", status="RUNNING", config=config, last_result={})
    table.on_trial_start(0, [trial], trial)
    assert not (tmp_path / "trials.csv").exists()  # events only mark rows stale
    table.on_step_end(0, [trial])
    assert pd.read_csv(tmp_path / "trials.csv")["epochs_run"].tolist() == [0]
    for epoch in (1, 2):
        result = {"epoch": epoch, "val_dice": 0.1 * epoch, "best_val_dice": 0.1 * epoch}
        table.on_trial_result(0, [trial], trial, result)
        trial.last_result = result  # Tune updates the trial after the callbacks
        table.on_step_end(0, [trial])
    assert pd.read_csv(tmp_path / "trials.csv")["epochs_run"].tolist() == [0]  # within the interval: not rewritten
    table.on_trial_complete(0, [trial], trial)
    table.on_experiment_end([trial])
    assert pd.read_csv(tmp_path / "trials.csv")[["epochs_run", "status"]].values.tolist() == [[2, "STOPPED_EARLY"]]


# ----------------------------------------------------------------------------- the report at 2,000 trials


@pytest.fixture(scope="module")
def many_trials(tmp_path_factory):
    from search.bench_scale import synthetic_run_dir
    from search.trials import read_table

    run_dir = synthetic_run_dir(150, tmp_path_factory.mktemp("many"))
    return run_dir, read_table(run_dir)


def test_report_of_many_trials_draws_a_few_traces_and_the_best_rows(many_trials):
    from search.report import TABLE_ROWS, learning_curves_figure, load_curves, sortable_table_html, timeline

    run_dir, table = many_trials
    curves = load_curves(run_dir, table)
    assert len(curves) == 150 and curves[table["trial_id"][0]]["epoch"][0] == 1
    figure = learning_curves_figure(curves, table, 20)
    statuses = table["status"].nunique()
    assert len(figure.data) == statuses + 10 + 1  # one trace per status, the 10 best on top, ASHA's stops
    assert sum(x is not None for trace in figure.data[:statuses] for x in trace.x) == table["epochs_run"].sum()
    fig, utilisation = timeline(table, 64)
    assert len(fig.data) == statuses and sum(len(trace.x) for trace in fig.data) == 150 and 0 < utilisation <= 100
    html = sortable_table_html(table)
    assert html.count("</tr>") == TABLE_ROWS + 1 and "every trial is in <code>trials.csv</code>" in html
    best = table.sort_values("best_val_dice", ascending=False)["trial_index"].iloc[0]
    assert f"<td>{best}</td>" in html


def test_report_bounds_work_on_a_study_with_pruned_and_failed_trials():
    """The sweep's study holds PRUNED (ASHA), FAIL and RUNNING trials beside COMPLETE ones: the parallel
    coordinates' best-k study takes COMPLETE ones only."""
    from search.report import best_trials_study

    study = optuna.create_study(direction="maximize")
    for i, state in enumerate(["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "RUNNING", "COMPLETE", "PRUNED"]):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        if state == "COMPLETE":
            study.tell(trial, 0.1 * i)
        elif state == "PRUNED":
            trial.report(0.9, 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif state == "FAIL":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    best = best_trials_study(study, 2)
    assert [t.value for t in best.trials] == pytest.approx([0.5, 0.3]) and {t.state.name for t in best.trials} == {"COMPLETE"}
    assert best_trials_study(study, 3) is study  # 3 COMPLETE trials: all of them


# ----------------------------------------------------------------------------- the bench itself


@pytest.mark.slow
def test_scale_bench_runs_simulated_trials_through_the_real_trainable(tmp_path):
    proc = run_cli("-m", "search.bench", "--scale", "--trials", "12", "--gpus", "4", "--epochs", "4", "--grace-period", "1",
                   "--epoch-s", "0.3", "--out", str(tmp_path / "out"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "this measures the orchestration, not training" in out
    assert "N=12: " in out and "12 trials" in out and "ms per trial result" in out
    assert "checkpoints left on disk: 0 (0.0 MiB)" in out  # every trial finished: all deleted
    table = pd.read_csv(tmp_path / "out" / "scale-12" / "trials.csv")
    assert len(table) == 12 and set(table["status"]) <= {"COMPLETED", "STOPPED_EARLY"}
    assert table["node_id"].notna().all()  # reported from inside the real trainable


# ----------------------------------------------------------------------------- checkpoints at a bounded cost


def test_checkpoints_are_written_when_their_cost_is_a_small_share_of_the_time_since_the_last():
    from search.trainable import checkpointing_report

    now = [0.0]
    reports = []

    def save(state, directory):
        now[0] += 1.0  # writing the state takes 1 s

    checkpoint_cls = SimpleNamespace(from_directory=lambda directory: "checkpoint")
    report = checkpointing_report(lambda metrics, checkpoint=None: reports.append((metrics["epoch"], checkpoint)),
                                  checkpoint_cls, save=save, cost_share=0.5, clock=lambda: now[0])
    for epoch, at in ((1, 0.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 6.0), (6, 7.5), (7, 8.0)):
        now[0] = at
        report({"epoch": epoch}, lambda: {"epoch": epoch})
    # a checkpoint costs 1 s: due again once 1 / 0.5 = 2 s have passed since the last one ended
    assert reports == [(1, "checkpoint"), (2, None), (3, "checkpoint"), (4, None), (5, "checkpoint"), (6, None), (7, None)]
    report({"epoch": 8}, None)  # nothing to save (a failed trial's report)
    assert reports[-1] == (8, None)


def test_tune_floor_summary_on_hand_made_marks():
    """--tune-floor's arithmetic: whole run from the start, steady state from the later of the cut-off
    and every slot's first start, utilisation to a trial's end or, when the cap stopped it, its last result."""
    from search.bench_floor import Mark, summarise

    start = Mark(0.0, 0.0, 0.0, (0, 0))
    marks = [Mark(100.0 + i, 1.0 + 0.01 * i, 0.5 + 0.005 * i, (100 + i, 200 + 4 * i)) for i in range(11)]
    spans = {"ended": [0.0, 90.0, 110.0], "capped": [10.0, 60.0, None], "never reported": [105.0, None, None]}
    r = summarise(start, marks, spans, slots=2, steady_after_s=5.0)
    assert r["steady_from_s"] == 10.0  # the second slot's first start, later than the 5 s cut-off
    assert r["whole"] == pytest.approx({"results": 11, "results_per_s": 0.1, "driver_ms_per_result": 100.0,
                                        "main_thread_ms_per_result": 50.0, "box_busy_fraction": 110 / 240})
    assert r["steady"] == pytest.approx({"results": 10, "results_per_s": 1.0, "driver_ms_per_result": 10.0,
                                         "main_thread_ms_per_result": 5.0, "box_busy_fraction": 0.25})
    assert r["utilisation"] == pytest.approx((110 + 50 + 0) / (2 * 110))
