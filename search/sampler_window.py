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

The best trials are read from the study (once per proposal), not from the sampler's
``after_trial``: in a sweep the study is told by ``search.studysearch.StudyCallback`` through its
own connection to the database, so this sampler never sees the tell. The view works on any
storage: it filters what ``study.get_trials`` / ``study._get_trials`` return (an ``RDBStorage``
study's included; each call still loads the trials, a cost linear in N, and only the model stops
growing) and passes everything else (``_storage``, ``_study_id``, directions) through.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState


class _StudyWindow:
    """``study`` with its trial lists cut to the window (everything else passes through)."""

    def __init__(self, study: optuna.Study, keep: set[int], first_recent: int):
        self._study = study
        self._keep = keep  # numbers of the best finished trials (RUNNING ones are always kept)
        self._first_recent = first_recent  # trials numbered from here on are "recent"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _cut(self, trials: list) -> list:
        return [t for t in trials if t.number >= self._first_recent or t.number in self._keep or t.state == TrialState.RUNNING]

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        return self._cut(self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return self._cut(self._study.get_trials(deepcopy=deepcopy, states=states))

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
    is three numbers and the window it computed last.
    """

    def __init__(self, sampler: BaseSampler, *, recent: int, best: int):
        self.sampler = sampler
        self.recent = recent
        self.best = best
        self._latest = -1  # highest trial number seen
        self._window: tuple[int, set[int]] | None = None  # (trial number, the best trials' numbers) last computed

    def _best_numbers(self, study: optuna.Study, number: int) -> set[int]:
        """Numbers of the ``best`` trials by TPE's ranking (``tpe_rank``), once per proposal."""
        if self._window is None or self._window[0] != number:
            finished = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=True)
            maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            top = heapq.nsmallest(self.best, finished, key=lambda t: tpe_rank(t, maximize))
            self._window = (number, {t.number for t in top})
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
