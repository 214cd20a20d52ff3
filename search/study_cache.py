"""The driver's connection to the study: Optuna's trial cache, refreshed by reading only what changed.

Optuna wraps an ``RDBStorage`` in ``_CachedStorage``, which keeps finished trials (they never change)
but re-reads every unfinished trial, whole, on every read of the study: with 64 trials running and
a lookahead, each such read loads ~70 trials' params, attributes and epochs through SQLAlchemy,
about 45 ms, and each proposal of the sweep's searcher makes two (Optuna's ``ask`` looks for
WAITING trials; the sampler window reads the study), as ``StudyCallback`` makes one per trial start.

``DeltaCachedStorage`` refreshes with one light query instead: the state of each cached unfinished
trial. It then loads whole only the trials that are new, whose state changed (a trial finished:
its epochs and value are final), or that were written through this connection since (the
proposal's own params and tags). A running trial's epochs and attributes written by another
connection are left as first read until it finishes: the samplers use a running trial's params
only (TPE's and GP's constant liar), and a single trial read (``get_trial``) still goes to the
database. Writes go straight to the database, as in Optuna's cache.

Both of the driver's connections (``search.studysearch``) use it; the report and the dashboards
read the database as usual.
"""

from __future__ import annotations

from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session


class DeltaCachedStorage(_CachedStorage):
    """``_CachedStorage`` over ``backend`` (an ``RDBStorage``) whose refresh reads only what changed (module doc)."""

    def __init__(self, backend) -> None:
        super().__init__(backend)
        self._written: set[int] = set()  # trials written through this connection since the last refresh
        self._newest_id: dict[int, int] = {}  # study id -> the highest trial id read

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            newest = self._newest_id.get(study_id, -1)
            reload = self._changed_states(study_id, study) | (self._written & study.unfinished_trial_ids)
            trials = self._backend._get_trials(study_id, states=None, included_trial_ids=reload,
                                               trial_id_greater_than=newest)
            self._written.difference_update(trial._trial_id for trial in trials)
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:
                self._newest_id[study_id] = max(self._newest_id.get(study_id, -1), trial._trial_id)
                if trial.state.is_finished():
                    study.unfinished_trial_ids.discard(trial._trial_id)
                else:
                    study.unfinished_trial_ids.add(trial._trial_id)

    def _changed_states(self, study_id: int, study: _StudyInfo) -> set[int]:
        """The cached unfinished trials whose state in the database is not the cached one (one light query)."""
        if not study.unfinished_trial_ids:
            return set()
        with _create_scoped_session(self._backend.scoped_session) as session:
            rows = (session.query(models.TrialModel.trial_id, models.TrialModel.number, models.TrialModel.state)
                    .filter(models.TrialModel.study_id == study_id,
                            models.TrialModel.trial_id.in_(study.unfinished_trial_ids))
                    .all())
        return {trial_id for trial_id, number, state in rows if study.trials[number].state != state}

    # every write through this connection: the trial is read whole at the next refresh
    def _wrote(self, trial_id: int) -> None:
        with self._lock:
            self._written.add(trial_id)

    def set_trial_param(self, trial_id, param_name, param_value_internal, distribution) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._wrote(trial_id)

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        try:
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            self._wrote(trial_id)

    def set_trial_intermediate_value(self, trial_id, step, intermediate_value) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._wrote(trial_id)

    def set_trial_user_attr(self, trial_id, key, value) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._wrote(trial_id)

    def set_trial_system_attr(self, trial_id, key, value) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._wrote(trial_id)
