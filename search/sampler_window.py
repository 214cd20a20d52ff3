"""The searcher's history, bounded: any Optuna sampler sees the best and the latest trials, not all of them.

Optuna's TPE reads every trial of the study on every proposal (Parzen estimators over all of them,
and ``group=True`` re-derives the groups from all of them), so a proposal costs time in proportion
to the trials so far and a sweep in proportion to their square: measured by
``python -m search.bench --scale`` on 2 shared cores, about 3 ms per proposal at 100 trials and
80 ms at 2,000 (all proposals of a 2,000-trial sweep: ~90 s of driver CPU).

``WindowedSampler`` gives the sampler a view of the study that holds the ``best`` highest-valued
finished trials, the ``recent`` latest trials (which include the ones still running, for the
constant liar) and nothing else. TPE's "good" set is at most the top 25 trials (its default gamma),
all of them in the view, and its default weights already fade out all but the latest 25 of the rest,
so the view changes what TPE models little while its cost stops growing. With fewer trials than the
window the sampler sees the whole study: small sweeps propose exactly what they did without it.
"""

from __future__ import annotations

import heapq
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState


class _StudyWindow:
    """``study`` with its trial lists cut to the window (everything else passes through)."""

    def __init__(self, study: optuna.Study, keep: set[int], first_recent: int):
        self._study = study
        self._keep = keep  # numbers of the best finished trials
        self._first_recent = first_recent  # trials numbered from here on are "recent"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _cut(self, trials: list) -> list:
        return [t for t in trials if t.number >= self._first_recent or t.number in self._keep]

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        return self._cut(self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return self._cut(self._study.get_trials(deepcopy=deepcopy, states=states))

    @property
    def trials(self) -> list:
        return self.get_trials()


class WindowedSampler(BaseSampler):
    """``sampler`` proposing from the ``best`` + ``recent`` window of the study (see the module doc)."""

    def __init__(self, sampler: BaseSampler, *, recent: int, best: int):
        self.sampler = sampler
        self.recent = recent
        self.best = best
        self._top: list[tuple[float, int]] = []  # min-heap of (signed value, number): the best finished trials
        self._latest = -1  # highest trial number seen

    def _view(self, study: optuna.Study, trial) -> optuna.Study | _StudyWindow:
        self._latest = max(self._latest, trial.number)
        first_recent = self._latest + 1 - self.recent
        if first_recent <= 0:
            return study  # the whole study fits in the window
        return _StudyWindow(study, {number for _, number in self._top}, first_recent)

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        if state == TrialState.COMPLETE and values:
            signed = values[0] if study.direction == optuna.study.StudyDirection.MAXIMIZE else -values[0]
            entry = (signed, trial.number)
            if len(self._top) < self.best:
                heapq.heappush(self._top, entry)
            elif entry > self._top[0]:
                heapq.heapreplace(self._top, entry)
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
