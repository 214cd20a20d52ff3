"""Tune's side of the study (``search.study``): the searcher that asks it, the callback that tells it.

Ray's ``OptunaSearch`` tells Optuna COMPLETE with the last result's value for every trial Tune
stops, so a trial ASHA stopped after one epoch looked like a finished one with a low score, and it
reports intermediate values only for results Tune does not stop on. Here:

- ``StudySearch`` (an ``OptunaSearch``) only asks: it tags each new Optuna trial with Tune's trial
  id, reports nothing and tells nothing. Tune pickles it with the experiment without the study
  (and without the storage URL's password) and reconnects it on ``--resume``.
- ``StudyCallback`` (a Tune callback, so it sees every result and the trial objects) writes each
  epoch as an intermediate value and finishes each trial in the state its trials.csv row has
  (``search.study.record_end``), with node, checkpoint path, wall time and failure reason. On
  ``--resume`` it marks FAIL the RUNNING trials the restored experiment does not hold.

Both run in the driver, each with its own connection to the study that reads only what changed
(``search.study_cache``); Tune calls the searcher, then the callbacks, for the same event before it
asks the searcher for the next trial, so the sampler always sees the finished state.
"""

from __future__ import annotations

import logging
import pickle
import time

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from search import study as studydb
from search.study_cache import DeltaCachedStorage
from search.trials import trial_row

logger = logging.getLogger(__name__)


def _connect(study_name: str, redacted_url: str, sampler=None):
    import optuna

    storage = DeltaCachedStorage(studydb.open_storage(studydb.connect_url(study_name, redacted_url)))
    return storage, optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                                      pruner=optuna.pruners.NopPruner())


class StudySearch(OptunaSearch):
    """``OptunaSearch`` on a stored study that leaves the telling to ``StudyCallback``.

    ``storage_url`` None keeps Optuna's in-memory storage (tests, and nothing to reconnect).
    """

    def __init__(self, *, storage_url: str | None, study_name: str, **kwargs):
        self._storage_url = studydb.redact(storage_url) if storage_url else None
        storage = DeltaCachedStorage(studydb.open_storage(storage_url)) if storage_url else None
        super().__init__(study_name=study_name, storage=storage, **kwargs)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials[trial_id]
        if studydb.TUNE_ID_ATTR not in trial.user_attrs:
            trial.set_user_attr(studydb.TUNE_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing: ``StudyCallback`` reports every epoch (Tune skips this for the result it stops a trial on)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Only bookkeeping: ``StudyCallback`` tells the study, right after, with the state trials.csv shows."""
        self._completed_trials.add(trial_id)

    # Tune pickles the searcher (tuner.pkl, searcher-state-*.pkl): keep the study, its connection
    # and the password out; keep the sampler (its random state) and the live trials' Optuna ids
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._storage_url is None:
            return state
        state["_ot_study"] = state["_storage"] = None
        state["_ot_trials"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()
                               if tid not in self._completed_trials}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._storage_url is None:
            return
        import optuna

        ids = state["_ot_trials"]
        self._storage, self._ot_study = _connect(self._study_name, self._storage_url, self._sampler)
        self._ot_trials = {tid: optuna.Trial(self._ot_study, oid) for tid, oid in ids.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Reconnect as saved. Which RUNNING trials are ghosts is ``StudyCallback``'s call: this file
        and Tune's experiment snapshot are written one after the other, so a killed driver can leave
        them a trial apart."""
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))


class StudyCallback(Callback):
    """Mirrors each trial into the study: epochs as intermediate values, the end state, user attributes."""

    def __init__(self, study_name: str, storage_url: str, max_epochs: int, metric: str):
        self.study_name = study_name
        self.storage_url = studydb.redact(storage_url)
        self.max_epochs = max_epochs
        self.metric = metric
        self._study = self._storage = None
        self._ids: dict[str, int] = {}  # Tune trial id -> Optuna trial id
        self._reconciled = False  # with the trials Tune restored, on this driver's first step

    def __getstate__(self) -> dict:
        return {"args": (self.study_name, self.storage_url, self.max_epochs, self.metric)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"])

    def _optuna_id(self, tune_trial_id: str) -> int | None:
        import optuna

        if self._study is None:
            self._storage, self._study = _connect(self.study_name, self.storage_url)
        if tune_trial_id not in self._ids:
            trial = studydb.find_trial(self._study, tune_trial_id, states=(optuna.trial.TrialState.RUNNING,))
            if trial is None:
                return None  # finished before a resume, or not ours
            self._ids[tune_trial_id] = trial._trial_id
        return self._ids[tune_trial_id]

    def _safely(self, what: str, trial, action) -> None:
        """A database hiccup is logged (ray.log), never allowed to stop the sweep."""
        try:
            trial_id = self._optuna_id(trial.trial_id)
            if trial_id is not None:
                action(trial_id)
        except Exception as err:  # noqa: BLE001
            logger.warning("study %s: could not record %s of %s (%s: %s)", self.study_name, what, trial,
                           type(err).__name__, err)

    def on_step_begin(self, iteration, trials, **info):
        """The first step, before Tune asks the searcher for a trial: a RUNNING trial of the study that
        the (restored) experiment does not hold was created after Tune's last snapshot by a driver that
        was killed; nothing will continue it, so it becomes FAIL with that reason (no ghost trials)."""
        if self._reconciled:
            return
        self._reconciled = True
        try:
            if self._study is None:
                self._storage, self._study = _connect(self.study_name, self.storage_url)
            failed = studydb.fail_stale_trials(self._study, self._storage, {trial.trial_id for trial in trials})
        except Exception as err:  # noqa: BLE001
            logger.warning("study %s: could not check for trials left RUNNING (%s: %s)", self.study_name,
                           type(err).__name__, err)
            return
        if failed:
            logger.warning("study %s: trials %s were left RUNNING by the stopped driver and are now FAIL",
                           self.study_name, failed)

    def on_trial_start(self, iteration, trials, trial, **info):
        def start(trial_id: int) -> None:
            if "start_ts" not in self._storage.get_trial(trial_id).user_attrs:  # kept from before a resume
                studydb.record_attrs(self._storage, trial_id, {"trial_name": str(trial), "start_ts": time.time()})

        self._safely("the start", trial, start)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("failure_reason"):
            return  # not a measurement: the trial ends FAIL with this reason

        def epoch(trial_id: int) -> None:
            studydb.record_epoch(self._storage, trial_id, result.get("epoch"), result.get(self.metric))
            if result.get("epoch") == 1 or "resumed_from_epoch" in result:  # where it runs (again)
                studydb.record_attrs(self._storage, trial_id, {"node_id": result.get("node_id")})

        self._safely("an epoch", trial, epoch)

    def _end(self, trial, tune_status: str) -> None:
        def end(trial_id: int) -> None:
            started = self._storage.get_trial(trial_id).user_attrs.get("start_ts")
            row = trial_row(trial, self.max_epochs, started, tune_status=tune_status)
            checkpoint = trial.checkpoint.path if trial.checkpoint is not None else None
            studydb.record_end(self._study, self._storage, trial_id, row, checkpoint)
            self._ids.pop(trial.trial_id, None)

        self._safely("the end", trial, end)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "TERMINATED")  # Tune marks it TERMINATED only after the callbacks

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "ERROR")
