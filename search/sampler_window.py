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
GP is bounded the same way (its Gaussian process over all COMPLETE trials costs more per trial than
TPE); random and QMC fit no model to the history, so for them the window changes next to nothing.

The best trials are read from the study (its COMPLETE trials, once per proposal), not from the
sampler's ``after_trial``: in a sweep the study is told by ``search.studysearch.StudyCallback``
through its own connection to the database, so this sampler never sees the tell. ASHA's stops are
PRUNED, not COMPLETE: they are in the view while recent, and TPE ranks every COMPLETE trial above
them anyway. The view works on any storage: it filters what ``study.get_trials`` /
``study._get_trials`` return (an ``RDBStorage`` study's included) and passes everything else
(``_storage``, ``_study_id``, directions) through to the study.
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
    """``sampler`` proposing from the ``best`` + ``recent`` window of the study (see the module doc).

    Pickles (Tune saves the searcher, and its sampler, with every experiment snapshot): its own state
    is three numbers and the window it computed last.
    """

    def __init__(self, sampler: BaseSampler, *, recent: int, best: int):
        self.sampler = sampler
        self.recent = recent
        self.best = best
        self._latest = -1  # highest trial number seen
        self._window: tuple[int, set[int]] | None = None  # (trial number, the best trials' numbers) last computed

    def _best_numbers(self, study: optuna.Study, number: int) -> set[int]:
        """Numbers of the ``best`` highest-valued COMPLETE trials (ties: the later trial), once per proposal."""
        if self._window is None or self._window[0] != number:
            complete = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
            sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
            top = heapq.nlargest(self.best, ((sign * t.value, t.number) for t in complete if t.value is not None))
            self._window = (number, {n for _, n in top})
        return self._window[1]

    def _view(self, study: optuna.Study, trial) -> optuna.Study | _StudyWindow:
        self._latest = max(self._latest, trial.number)
        first_recent = self._latest + 1 - self.recent
        if first_recent <= 0:
            return study  # the whole study fits in the window
        return _StudyWindow(study, self._best_numbers(study, trial.number), first_recent)

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
