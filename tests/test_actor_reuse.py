"""search.actor_reuse: a trial process Ray has begun to start runs a trial instead of being killed for a kept one.

Two slots, three trials, process reuse on. The first process to start is quick; any other process
is slow to start: its ``setup`` waits until some trial has run in a reused process. Tune stages all
three trials and places two. When the quick process's trial ends, Tune keeps that process for a
waiting trial:
- as shipped, it hands it to the trial whose process is starting and stops that process, which then
  never runs a trial;
- mended, the starting process keeps its trial and the kept one goes to the third trial, whose
  request had not been placed; so every process started runs a trial.
That the kept process is handed on in the same step (not left for Tune's later steps to find) is
checked on a stand-in for Tune's controller, the last test.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

SWEEP = r"""
import json, os, sys, time
from pathlib import Path

import ray
from ray import tune

marks, ray_tmp, mended = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "mended"
if mended:
    from search.actor_reuse import keep_starting_processes

    keep_starting_processes()


class SlowToStart(tune.Trainable):
    def setup(self, config):
        self.reused = False
        (marks / f"process-{os.getpid()}").touch()
        try:
            os.close(os.open(marks / "quick", os.O_CREAT | os.O_EXCL))  # the first process to get here
        except FileExistsError:
            deadline = time.monotonic() + 60
            while not list(marks.glob("reused-*")):
                if time.monotonic() > deadline:  # the kept process was not handed on: the test fails on this mark
                    (marks / f"timed-out-{os.getpid()}").touch()
                    break
                time.sleep(0.05)

    def step(self):
        (marks / f"trial-{os.getpid()}-{self.trial_id}").touch()
        if self.reused:
            (marks / f"reused-{os.getpid()}").touch()
        return {"done": True}

    def reset_config(self, new_config):
        self.reused = True
        return True

    def save_checkpoint(self, checkpoint_dir):  # Tune saves a trial that ends
        return None

    def load_checkpoint(self, checkpoint):
        pass


ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="ERROR", log_to_driver=False)
grid = tune.Tuner(tune.with_resources(SlowToStart, {"cpu": 1}),
                  tune_config=tune.TuneConfig(num_samples=3, reuse_actors=True),
                  run_config=tune.RunConfig(storage_path=str(marks.parent / "results"), name="reuse", verbose=0)).fit()
print(json.dumps(sorted(r.metrics.get("done", False) for r in grid)))
"""


@pytest.mark.parametrize("tune_as", ["mended", "shipped"])
def test_a_process_ray_began_to_start_runs_a_trial(tmp_path, ray_tmp, tune_as):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = run_cli("-c", SWEEP, str(marks), str(ray_tmp), tune_as, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, True, True]  # every trial ran

    processes = {p.name.split("-")[1] for p in marks.glob("process-*")}
    ran_a_trial = {p.name.split("-")[1] for p in marks.glob("trial-*")}
    assert len(list(marks.glob("trial-*"))) == 3
    if tune_as == "mended":
        assert processes == ran_a_trial and len(processes) == 2
        assert not list(marks.glob("timed-out-*"))  # the third trial took the kept process at once
    else:  # Tune 2.60 as shipped: a process it stopped while it started ran nothing (the mend's reason)
        assert processes - ran_a_trial


class _Trial:
    def __init__(self, name, resources="1 CPU"):
        self.name, self.placement_group_factory = name, resources

    def __repr__(self):
        return self.name


class _Controller:
    """The parts of Tune 2.60's controller the mend reads: trials in Tune's order and their processes."""

    def __init__(self, trials, starting=(), placed=(), kept=0):
        from ray.tune.utils.object_cache import _ObjectCache

        self._trials, self._pending_trials, self._resetting_trials = trials, set(trials), set()
        self._trial_to_actor = {t: f"actor of {t}" for t in (*starting, *placed)}
        self._staged_trials = set(self._trial_to_actor)
        self._started_actors = set()  # none is ready yet
        live = {f"actor of {t}" for t in starting}  # created; a placed-but-waiting request is not
        self._actor_manager = type("Actors", (), {"is_actor_started": staticmethod(lambda actor: actor in live)})()
        self._actor_cache = _ObjectCache()
        for i in range(kept):
            self._actor_cache.increase_max("1 CPU")
            self._actor_cache.cache_object("1 CPU", f"kept {i}")
        self.reused, self.scheduled = [], []

    def _schedule_trial_actor(self, trial):
        self.scheduled.append(trial)


def _tune_reuse(controller, trial):
    controller.reused.append(trial)
    return True


def test_the_kept_process_goes_at_once_to_the_first_trial_whose_request_is_not_placed():
    from search.actor_reuse import hand_on_kept_process

    a, b, c = _Trial("a"), _Trial("b"), _Trial("c")
    waiting_request = _Controller([a, b, c], starting=[a], placed=[b], kept=1)  # b's request waits for resources
    assert hand_on_kept_process(waiting_request, a, _tune_reuse) is False
    assert waiting_request.reused == [b] and waiting_request.scheduled == []  # Tune swaps b's request for the kept one

    no_request = _Controller([a, b, c], starting=[a, b], kept=1)  # c has no request yet
    assert hand_on_kept_process(no_request, a, _tune_reuse) is False
    assert no_request.scheduled == [c] and c in no_request._staged_trials and no_request.reused == []

    nothing_kept = _Controller([a, b, c], starting=[a], placed=[b], kept=0)
    assert hand_on_kept_process(nothing_kept, a, _tune_reuse) is False
    assert nothing_kept.reused == nothing_kept.scheduled == []

    not_starting = _Controller([a, b], placed=[a], kept=1)  # a's request waits: Tune's own reuse decides
    assert hand_on_kept_process(not_starting, a, _tune_reuse) is True and not_starting.reused == [a]
