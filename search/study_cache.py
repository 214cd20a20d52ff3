"""The driver's connection to the study: Optuna's trial cache, refreshed by reading only what changed.

Optuna wraps an ``RDBStorage`` in ``_CachedStorage``, which keeps finished trials (they never change)
but re-reads every unfinished trial, whole, on every read of the study: with 64 trials running and
a lookahead, each such read loads ~70 trials' params, attributes and epochs through SQLAlchemy,
about 45 ms, and each proposal of the sweep's searcher makes two (Optuna's ``ask`` looks for
WAITING trials; the sampler window reads the study), as ``StudyCallback`` makes one per trial start.

``DeltaCachedStorage`` refreshes with one query instead: the id and state of the study's unfinished
trials and of any newer than it has read. When nothing changed, that is all; otherwise it loads
whole only the trials that are new, whose state changed (a finished trial's epochs and value are
final), or that were written through this connection since their last whole read.

A running trial's epochs and attributes written by *another* connection stay as first read until
its state changes. That is safe because of how the driver uses the study: only its searcher
creates and samples trials, and it writes all of a trial's params, TPE's/GP's relative params
(system attributes) and the Tune id tag through its own connection within one proposal, before
Tune starts the trial, so both connections read the trial whole after that. The samplers read a
running trial's params and those attributes only (the constant liar); ``StudyCallback`` reads its
tag. A single trial read (``get_trial``) of an unfinished trial still goes to the database. Another
process proposing into the same study would be seen without its params: not supported. New trials
are found by id: Optuna allocates a study's trial ids under a lock on the study's row, so they are
committed in order. Writes go straight to the database, as in Optuna's cache.

Both of the driver's connections (``search.studysearch``) use it; the report and the dashboards
read the database as usual.
"""

from __future__ import annotations

import sqlalchemy
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


class DeltaCachedStorage(_CachedStorage):
    """``_CachedStorage`` over ``backend`` (an ``RDBStorage``) whose refresh reads only what changed (module doc).

    ``_StudyInfo.last_finished_trial_id`` is not used: ``_newest_trial_id`` replaces it.
    """

    def __init__(self, backend) -> None:
        super().__init__(backend)
        self._written_since_read: set[int] = set()  # trials written through this connection since their last whole read
        self._newest_trial_id: dict[int, int] = {}  # study id -> the highest trial id read

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            newest = self._newest_trial_id.get(study_id, -1)
            reload = self._to_reload(study_id, study, newest) if newest >= 0 else set()  # first read: every trial
            if newest >= 0 and not reload:
                return
            trials = self._backend._get_trials(study_id, states=None, included_trial_ids=reload,
                                               trial_id_greater_than=newest)
            self._written_since_read.difference_update(trial._trial_id for trial in trials)
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:
                if trial.state.is_finished():
                    study.unfinished_trial_ids.discard(trial._trial_id)
                else:
                    study.unfinished_trial_ids.add(trial._trial_id)
            if trials:
                self._newest_trial_id[study_id] = max(newest, max(trial._trial_id for trial in trials))

    def _to_reload(self, study_id: int, study: _StudyInfo, newest: int) -> set[int]:
        """The trials to read whole: one query of the unfinished and newer trials' ids and states."""
        with _create_scoped_session(self._backend.scoped_session) as session:
            rows = (session.query(models.TrialModel.trial_id, models.TrialModel.state)
                    .filter(models.TrialModel.study_id == study_id,
                            sqlalchemy.or_(models.TrialModel.trial_id > newest, models.TrialModel.state.in_(UNFINISHED)))
                    .all())
        number = self._trial_id_to_study_id_and_number
        new_or_changed = {trial_id for trial_id, state in rows if trial_id not in study.unfinished_trial_ids
                          or study.trials[number[trial_id][1]].state != state}
        finished = study.unfinished_trial_ids - {trial_id for trial_id, _ in rows}
        return new_or_changed | finished | (self._written_since_read & study.unfinished_trial_ids)

    # every write through this connection: the trial is read whole at the next refresh
    def _mark_written(self, trial_id: int) -> None:
        with self._lock:
            self._written_since_read.add(trial_id)

    def set_trial_param(self, trial_id, param_name, param_value_internal, distribution) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._mark_written(trial_id)

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        self._mark_written(trial_id)
        return changed

    def set_trial_intermediate_value(self, trial_id, step, intermediate_value) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._mark_written(trial_id)

    def set_trial_user_attr(self, trial_id, key, value) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._mark_written(trial_id)

    def set_trial_system_attr(self, trial_id, key, value) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._mark_written(trial_id)
