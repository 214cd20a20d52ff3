"""Tune's process reuse, mended so that a trial process Ray has begun to start is never killed for a kept one.

With ``reuse_actors=True`` Tune keeps the process of a trial that ended and hands it to a trial that
waits for a slot (no Python, torch and smp imported again). Tune also asks Ray for a new process for
every waiting trial it stages. When a kept process is free, Tune 2.60
(``TuneController._maybe_reuse_cached_actor``) gives it to the first staged trial in line and removes
that trial's own request, even where Ray has already placed it and begun to start the process. That
process is killed half-started and its slot is free again; the next staged trial's request takes the
slot and starts another process, which the next kept process kills in turn.

On a loaded machine a process takes seconds to start and trials end more often than that, so the
slots that free at the start of a sweep never fill: ``search.bench --tune-floor`` (Tune alone, 64
slots, 2 s epochs, 2 minutes) ran at most 31 trials at once, its raylet started 194 processes
for 31 that ever ran a trial, and it delivered 11.9 results/s in the steady state (ideal 32).

The mend: a trial whose process Ray is starting (its resources acquired, ``__init__`` not yet
returned) keeps it; the kept process goes to a staged trial whose request Ray has not placed (so
nothing is started for nothing) or waits one step for the next trial the searcher proposes. Trials
whose request is still waiting for resources are handled as Tune does. With it the same bench ran 64
trials at once and gave 31.2 results/s in the steady state (README, Scaling).
"""

from __future__ import annotations


def _keeps_its_starting_process(controller, trial) -> bool:
    """Whether ``trial`` already has a process that Ray is starting (resources held, not yet started)."""
    actor = controller._trial_to_actor.get(trial)
    return (actor is not None and trial not in controller._resetting_trials
            and actor not in controller._started_actors and controller._actor_manager.is_actor_started(actor))


def keep_starting_processes() -> None:
    """Install the mend on Tune's controller, in this (the driver's) process; idempotent."""
    from ray.tune.execution.tune_controller import TuneController

    tune_reuse = TuneController._maybe_reuse_cached_actor
    if getattr(tune_reuse, "keeps_starting_processes", False):
        return

    def maybe_reuse_cached_actor(self, trial) -> bool:
        if _keeps_its_starting_process(self, trial):
            return False
        return tune_reuse(self, trial)

    maybe_reuse_cached_actor.keeps_starting_processes = True
    maybe_reuse_cached_actor.__wrapped__ = tune_reuse  # Tune's own, for a test to compare with
    TuneController._maybe_reuse_cached_actor = maybe_reuse_cached_actor
