"""Tune's process reuse, mended so that a trial process Ray has begun to start is never stopped for a kept one.

With ``reuse_actors=True`` Tune keeps the process of a trial that ended for a trial waiting for a
slot, and asks Ray for a new process for every waiting trial it stages. Ray 2.60's
``TuneController._maybe_reuse_cached_actor`` gives a kept process to a staged trial even when Ray
has already placed that trial's request and is starting its process, and stops that process. Its
slot frees, the next staged request takes it and starts another process, which the next kept
process stops in turn: on a busy machine, where a process takes seconds to start and trials end
more often than that, the slots freed at a sweep's start never fill (README, Scaling).

The mend: a trial whose process is starting keeps it, and the kept process goes to the first other
waiting trial whose request Ray has not placed (that request is withdrawn, nothing was started for
it). Ray 2.60 has no hook for this, so ``keep_starting_processes`` replaces the method on the class,
for every Tune experiment this (the driver's) process runs afterwards.
"""

from __future__ import annotations

import warnings

MENDED_RAY = "2.60."  # the controller's private attributes read below are Ray 2.60's


def _process_is_starting(controller, trial) -> bool:
    """Whether Ray has created ``trial``'s own process and Tune has not yet seen it ready."""
    actor = controller._trial_to_actor.get(trial)
    return actor is not None and actor not in controller._started_actors and controller._actor_manager.is_actor_started(actor)


def _trial_without_a_starting_process(controller, resources):
    """The first waiting trial, in Tune's order (the scheduler's), that asks for ``resources`` and whose
    request Ray has not placed (none made yet, or one still waiting for resources)."""
    for trial in controller._trials:
        if (trial in controller._pending_trials and trial.placement_group_factory == resources
                and trial not in controller._resetting_trials and not _process_is_starting(controller, trial)
                and not (trial in controller._trial_to_actor and trial not in controller._staged_trials)):
            return trial
    return None


def hand_on_kept_process(controller, trial, tune_reuse) -> bool:
    """``_maybe_reuse_cached_actor`` mended; ``tune_reuse``: Tune's own. False where ``trial``'s process is
    starting: the kept process (if any) goes to another waiting trial, in this same step."""
    if not _process_is_starting(controller, trial):
        return tune_reuse(controller, trial)
    if controller._actor_cache.has_cached_object(trial.placement_group_factory):
        other = _trial_without_a_starting_process(controller, trial.placement_group_factory)
        if other is not None and other in controller._staged_trials:  # its request is waiting: Tune withdraws it
            tune_reuse(controller, other)
        elif other is not None:  # not staged yet: staged as Tune stages a waiting trial, and given the kept process
            controller._staged_trials.add(other)
            controller._actor_cache.increase_max(other.placement_group_factory)
            controller._schedule_trial_actor(other)
    return False


def keep_starting_processes() -> None:
    """Install the mend on Tune's controller class (idempotent); a Ray other than 2.60 is left as shipped, with a warning."""
    import ray
    from ray.tune.execution.tune_controller import TuneController

    tune_reuse = TuneController._maybe_reuse_cached_actor
    if getattr(tune_reuse, "keeps_starting_processes", False):
        return
    if not ray.__version__.startswith(MENDED_RAY):
        warnings.warn(f"search.actor_reuse mends Ray {MENDED_RAY}x's Tune, not Ray {ray.__version__}: Tune's process reuse "
                      "is left as shipped", stacklevel=2)
        return

    def maybe_reuse_cached_actor(self, trial) -> bool:
        return hand_on_kept_process(self, trial, tune_reuse)

    maybe_reuse_cached_actor.keeps_starting_processes = True
    TuneController._maybe_reuse_cached_actor = maybe_reuse_cached_actor
