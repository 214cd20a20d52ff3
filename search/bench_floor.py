"""``python -m search.bench --tune-floor``: what Ray Tune alone costs per trial result on this machine.

    python -m search.bench --tune-floor [--epoch-s 2] [--max-minutes 4] [--gpus 64] [--no-loggers] [--tune-as-shipped]

The floor under ``--scale``'s driver numbers: the same local cluster of logical GPUs (and its Ray
settings), ASHA (grace 2, reduction 3, 20 epochs), trials that sleep ``--epoch-s`` (0.8-1.2x) per
epoch and report a ``--checkpoint-kb`` checkpoint each epoch (two kept), and as many trials at once
as ``search.tuner.lookahead`` allows, with Tune's process reuse mended as the sweep's is
(``search.actor_reuse``; ``--tune-as-shipped`` leaves Tune as it is), but nothing else of ours:
Tune's own searcher (random), no study, no callbacks but Tune's default loggers (result.json,
progress.csv, TensorBoard; ``--no-loggers`` drops them). Prints, over the whole run and over the
steady state (from the later of ``--steady-after-s`` and the moment every slot has started a
trial, to the last result): results per second, the driver's CPU per result (all threads; its main
thread) and how busy the machine's CPUs were (every process on it); over the run, Ray's worker
starts and the slot utilisation (a trial holds its slot from its start to its end, or to its last
result when the cap stops it).
**It measures orchestration, not training.**
"""

from __future__ import annotations

import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from search.bench_probes import SIMULATED_CLUSTER_ENV, box_cpu_ticks, cpu_s, load_average, local_cluster, time_cap, worker_starts

HEAD_PORT, NODE_PORT_BASE = 6447, 26000  # away from --scale's (6445, 25000) and the tests' clusters


def sleeping_trial(config: dict) -> None:
    from ray import tune

    jitter = random.Random(config["seed"])
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_s"] * (0.8 + 0.4 * jitter.random()))
        metrics = {"epoch": epoch, "val_dice": config["quality"] * (1 - 0.8 ** epoch) + 0.02 * jitter.random()}
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "state.bin").write_bytes(os.urandom(1024 * config["checkpoint_kb"]))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class Mark(NamedTuple):
    """The driver's clocks at one result."""
    wall_s: float
    driver_cpu_s: float
    main_cpu_s: float
    box_ticks: tuple[int, int]


def now() -> Mark:
    return Mark(time.time(), cpu_s(), time.thread_time(), box_cpu_ticks())


def marks_callback(marks: list, spans: dict):
    """A Tune callback that notes the clocks at each result, and each trial's [start, last result, end]."""
    from ray.tune import Callback

    class Marks(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            spans[trial.trial_id] = [time.time(), None, None]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            marks.append(now())
            spans.setdefault(trial.trial_id, [marks[-1].wall_s, None, None])[1] = marks[-1].wall_s

        def on_trial_complete(self, iteration, trials, trial, **info):
            spans.setdefault(trial.trial_id, [time.time(), None, None])[2] = time.time()

        on_trial_error = on_trial_complete

    return Marks()


def per_result(first: Mark, last: Mark, results: int) -> dict:
    busy, total = (b - a for a, b in zip(first.box_ticks, last.box_ticks))
    return {"results": results, "results_per_s": results / max(last.wall_s - first.wall_s, 1e-9),
            "driver_ms_per_result": 1000 * (last.driver_cpu_s - first.driver_cpu_s) / max(results, 1),
            "main_thread_ms_per_result": 1000 * (last.main_cpu_s - first.main_cpu_s) / max(results, 1),
            "box_busy_fraction": busy / max(total, 1)}


def summarise(start: Mark, marks: list[Mark], spans: dict, slots: int, steady_after_s: float) -> dict:
    """Whole-run and steady-state rates from the marks; slot utilisation from the spans."""
    if len(marks) < 2:
        raise SystemExit("search.bench --tune-floor: fewer than 2 results; raise --max-minutes")
    starts = sorted(s for s, _, _ in spans.values())
    steady_from = max(start.wall_s + steady_after_s, starts[slots - 1] if len(starts) >= slots else float("inf"))
    steady = [m for m in marks if m.wall_s >= steady_from]
    held = [((end or last or begin) - begin, begin, end or last or begin) for begin, last, end in spans.values()]
    span_s = max(e for _, _, e in held) - min(b for _, b, _ in held)
    return {"trials": len(spans), "whole": per_result(start, marks[-1], len(marks)),
            "steady": per_result(steady[0], steady[-1], len(steady) - 1) if len(steady) >= 2 else None,
            "steady_from_s": steady_from - start.wall_s,
            "utilisation": sum(h for h, _, _ in held) / (slots * span_s) if span_s > 0 else float("nan")}


def run_floor(args, temp_dir: Path) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from search.tuner import lookahead_trials

    marks, spans = [], {}
    with local_cluster(0, args.gpus, args.gpus, temp_dir / "ray", HEAD_PORT, NODE_PORT_BASE, "search.bench --tune-floor",
                       SIMULATED_CLUSTER_ENV) as cluster:
        ray.init(address=cluster["address"], logging_level="ERROR", log_to_driver=False)
        try:
            starts_before = worker_starts(temp_dir / "ray")
            scheduler = ASHAScheduler(time_attr="epoch", metric="val_dice", mode="max", max_t=args.epochs, grace_period=2, reduction_factor=3)
            tuner = tune.Tuner(
                tune.with_resources(sleeping_trial, {"cpu": 1, "gpu": 1}),
                param_space={"seed": tune.randint(0, 2**31), "quality": tune.uniform(0.3, 0.9), "epoch_s": args.epoch_s,
                             "epochs": args.epochs, "checkpoint_kb": args.checkpoint_kb},
                tune_config=tune.TuneConfig(num_samples=args.trials, scheduler=scheduler, reuse_actors=True,
                                            max_concurrent_trials=args.gpus + lookahead_trials(args.gpus)),
                run_config=tune.RunConfig(storage_path=str(temp_dir / "results"), name="floor", verbose=0,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                          callbacks=[marks_callback(marks, spans)]))
            with time_cap(60 * args.max_minutes):
                start = now()
                grid = tuner.fit()
            r = {"worker_starts": worker_starts(temp_dir / "ray") - starts_before, "errors": grid.num_errors}
        finally:
            ray.shutdown()
    return {**r, **summarise(start, marks, spans, args.gpus, args.steady_after_s)}


def print_floor(r: dict, args) -> None:
    print(f"{r['whole']['results']} results from {r['trials']} trials ({r['errors']} errors) on {args.gpus} slots, mean epoch sleep "
          f"{args.epoch_s:g} s, Tune's loggers {'off' if args.no_loggers else 'on'}; {r['worker_starts']} worker processes "
          f"started by Ray (the raylet's count); slot utilisation {100 * r['utilisation']:.1f} %")
    for label, m in (("whole run", r["whole"]), (f"steady state (from {r['steady_from_s']:.0f} s)", r["steady"])):
        if m is None:
            print(f"  {label}: fewer than 2 results; raise --max-minutes")
            continue
        print(f"  {label}, {m['results']} results: {m['results_per_s']:.1f} results/s (ideal {args.gpus / args.epoch_s:.0f}); "
              f"driver CPU {m['driver_ms_per_result']:.2f} ms per result (main thread {m['main_thread_ms_per_result']:.2f} ms); "
              f"the machine's {os.cpu_count()} CPUs {100 * m['box_busy_fraction']:.1f} % busy")


def main(argv=None) -> None:
    from tumorseg.cli import ArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    p = ArgumentParser(prog="search.bench --tune-floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--epoch-s", type=float, default=2.0, help="mean sleep of one simulated epoch")
    p.add_argument("--epochs", type=int, default=20, help="epoch budget (ASHA max_t)")
    p.add_argument("--gpus", type=int, default=64, help="logical GPUs = trial slots")
    p.add_argument("--trials", type=int, default=2000, help="trials to sample (the time cap usually ends the run first)")
    p.add_argument("--checkpoint-kb", type=int, default=16, help="size of each epoch's checkpoint, as --scale's")
    p.add_argument("--max-minutes", type=float, default=4.0, help="stop after this long (Tune stops the running trials)")
    p.add_argument("--steady-after-s", type=float, default=90.0, help="the steady state starts no earlier than this")
    p.add_argument("--no-loggers", action="store_true", help="without Tune's result.json/progress.csv/TensorBoard loggers")
    p.add_argument("--tune-as-shipped", action="store_true", help="without search.actor_reuse's mend of Tune's process reuse")
    args = p.parse_args(argv)
    if args.no_loggers:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the local cluster's; read when Ray is first imported
    from search.rundir import package_versions
    from tumorseg.bench import machine

    print(f"$ python -m search.bench --tune-floor {shlex.join(argv)}".rstrip())
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"versions: ray {package_versions()['ray']}")
    print("SIMULATION: trials sleep; Ray Tune alone (no study, no searcher or callbacks of ours): this measures Tune's orchestration.")
    if not args.tune_as_shipped:
        from search.actor_reuse import keep_starting_processes

        keep_starting_processes()
    print(f"Tune's process reuse: {'as shipped' if args.tune_as_shipped else 'mended (search.actor_reuse)'}")
    with tempfile.TemporaryDirectory(prefix="tsb-floor-", dir="/tmp", ignore_cleanup_errors=True) as tmp:  # short: Ray's socket paths
        print_floor(run_floor(args, Path(tmp)), args)
    print(f"load average at the end {load_average()}")
