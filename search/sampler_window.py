"""The searcher's history, bounded: TPE and GP see the best, the latest and the running trials, not all.

Optuna's TPE reads every trial of the study on every proposal (Parzen estimators over all of them,
and ``group=True`` re-derives the groups from all of them), so a proposal costs time in proportion
to the trials so far and a sweep in proportion to their square: measured by
``python -m search.bench --scale --searcher-only`` on 2 shared cores, about 6 ms per proposal at
100 trials and 58 ms at 2,000 without the window, 15 ms with it.

``WindowedSampler`` gives the sampler a view of the study that holds the ``best`` trials as TPE
ranks them (COMPLETE by value, then PRUNED by the last epoch reached and its value: with ASHA most
trials are PRUNED, and one stopped late may be among the best), the ``recent`` latest trials, every
trial still RUNNING (the constant liar's; an ASHA survivor can outlive hundreds of newer starts),
and nothing else. TPE's "good" set is at most its top 25 (default gamma), all in the view; what the
view leaves out are older middling and poor trials, which shape TPE's "bad" density (down-weighted
by age already by its default weights) and GP's fit. With fewer trials than the window the
sampler sees the whole study: small sweeps propose exactly what they did without it. Random and
QMC fit no model to the history and are not wrapped (``search.tuner.WINDOWED``).

The view is read from the study once per proposal (whether or not the study fits the window),
not from the sampler's ``after_trial``: in a sweep the study is told by
``search.studysearch.StudyCallback`` through its own connection to the database, so this sampler
never sees the tell. TPE asks for the trials several times per proposal; with the constant liar
each parameter group's ask bypasses Optuna's per-proposal cache and reaches the storage (on the
sweep's database, one query of the unfinished trials' states, and more when some changed:
``search.study_cache``). The view serves every ask from its one read. It works on any storage, filtering
what that read returned, and passes everything else (``_storage``, ``_study_id``, directions) through.
"""

from __future__ import annotations

import copy
import heapq
import math
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState


class _StudyWindow:
    """``study`` with its trial lists cut to the window, read once per proposal (everything else passes through)."""

    def __init__(self, study: optuna.Study, trials: list):
        self._study = study
        self._trials = trials  # the window's trials, every state, as read at the proposal's start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list:
        return self.get_trials()


def tpe_rank(trial, maximize: bool) -> tuple:
    """Where TPE ranks a finished trial (smaller is better), as its ``_split_trials`` does: COMPLETE
    trials by value, then PRUNED ones by the last step reached (later first) and its value; ties: the
    later trial."""
    sign = -1.0 if maximize else 1.0
    if trial.state == TrialState.COMPLETE:
        value = trial.value
        return (0, math.inf if value is None or math.isnan(value) else sign * value, 0.0, -trial.number)
    if trial.intermediate_values:
        step, value = max(trial.intermediate_values.items())
        return (1, -step, math.inf if math.isnan(value) else sign * value, -trial.number)
    return (2, 0, 0.0, -trial.number)


class WindowedSampler(BaseSampler):
    """``sampler`` proposing from the ``best`` + ``recent`` window of the study (see the module doc).

    Pickles (Tune saves the searcher, and its sampler, with every experiment snapshot): its own state
    is three numbers; the window is read again for the next proposal.
    """

    def __init__(self, sampler: BaseSampler, *, recent: int, best: int):
        self.sampler = sampler
        self.recent = recent
        self.best = best
        self._latest = -1  # highest trial number seen
        self._window: tuple[tuple, list] | None = None  # (which trial of which study, its trials) of the proposal under way

    def __getstate__(self) -> dict:  # the window is read again for the next proposal
        return {**self.__dict__, "_window": None}

    def _view(self, study: optuna.Study, trial) -> _StudyWindow:
        """The study as this proposal sees it, read at its first call (one proposal at a time: Ray's
        searcher proposes on the driver's loop)."""
        key = (id(study._storage), study._study_id, trial._trial_id)
        if self._window is None or self._window[0] != key:  # a new proposal: one read of the study
            self._latest = max(self._latest, trial.number)
            first_recent = self._latest + 1 - self.recent
            every = study._get_trials(deepcopy=False, use_cache=False)
            if first_recent <= 0:  # the whole study fits in the window
                window = every
            else:
                finished = [t for t in every if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
                best = {t.number for t in heapq.nsmallest(self.best, finished, key=lambda t: tpe_rank(t, maximize))}
                window = [t for t in every if t.number >= first_recent or t.number in best or t.state == TrialState.RUNNING]
            self._window = (key, window)
        return _StudyWindow(study, self._window[1])

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
