"""``python -m search.bench --tune-floor``: what Ray Tune alone costs per trial result on this machine.

    python -m search.bench --tune-floor [--epoch-s 2] [--minutes 4] [--gpus 64] [--no-loggers]

The floor under ``--scale``'s driver numbers: the same local cluster of logical GPUs, the same ASHA
(grace 2, reduction 3, 20 epochs) and trials that sleep ``--epoch-s`` (0.8-1.2x) per epoch, but
nothing of ours: Tune's own searcher (random), no study, no callbacks but Tune's default loggers
(result.json, progress.csv, TensorBoard; ``--no-loggers`` drops them), ``slots`` + ``slots // 8``
trials at once as ``search.tuner.lookahead`` allows. Prints, over the steady state (from
``--steady-after-s`` to the cap): results per second, the driver's CPU per result (all threads; its
main thread), how busy the machine's CPUs were, and, over the run, the worker processes Ray started and
the slot utilisation. **It measures orchestration, not training.**
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from search.bench_probes import box_cpu_ticks, cpu_s, local_cluster, worker_starts

HEAD_PORT, NODE_PORT_BASE = 6447, 26000  # away from --scale's (6445, 25000) and the tests' clusters


def sleeping_trial(config: dict) -> None:
    from ray import tune

    jitter = random.Random(config["seed"])
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_s"] * (0.8 + 0.4 * jitter.random()))
        tune.report({"epoch": epoch, "val_dice": config["quality"] * (1 - 0.8 ** epoch) + 0.02 * jitter.random()})


def marks_callback(marks: list, spans: dict):
    """A Tune callback that notes, per result, (wall, driver CPU, main-thread CPU, machine ticks), and each trial's span."""
    from ray.tune import Callback

    class Marks(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            spans[trial.trial_id] = [time.time(), None]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            marks.append((time.perf_counter(), cpu_s(), time.thread_time(), box_cpu_ticks()))

        def on_trial_complete(self, iteration, trials, trial, **info):
            spans[trial.trial_id][1] = time.time()

    return Marks()


def run_floor(args, temp_dir: Path) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    marks, spans = [], {}
    with local_cluster(0, args.gpus, args.gpus, temp_dir / "ray", HEAD_PORT, NODE_PORT_BASE, "search.bench --tune-floor") as cluster:
        ray.init(address=cluster["address"], logging_level="ERROR", log_to_driver=False)
        scheduler = ASHAScheduler(time_attr="epoch", metric="val_dice", mode="max", max_t=args.epochs, grace_period=2, reduction_factor=3)
        tuner = tune.Tuner(
            tune.with_resources(sleeping_trial, {"cpu": 1, "gpu": 1}),
            param_space={"seed": tune.randint(0, 2**31), "quality": tune.uniform(0.3, 0.9), "epoch_s": args.epoch_s, "epochs": args.epochs},
            tune_config=tune.TuneConfig(num_samples=args.trials, scheduler=scheduler, reuse_actors=True,
                                        max_concurrent_trials=args.gpus + max(1, args.gpus // 8)),
            run_config=tune.RunConfig(storage_path=str(temp_dir / "results"), name="floor", verbose=0,
                                      callbacks=[marks_callback(marks, spans)]))
        cap = threading.Timer(60 * args.minutes, os.kill, (os.getpid(), signal.SIGINT))  # Tune stops gracefully
        cap.start()
        t0 = time.perf_counter()
        try:
            tuner.fit()
        finally:
            cap.cancel()
        starts = worker_starts(temp_dir / "ray")
        ray.shutdown()
    steady = [m for m in marks if m[0] - t0 >= args.steady_after_s]
    if len(steady) < 2:
        raise SystemExit(f"search.bench --tune-floor: fewer than 2 results after {args.steady_after_s:g} s; raise --minutes")
    (wall0, cpu0, main0, box0), (wall1, cpu1, main1, box1) = steady[0], steady[-1]
    n = len(steady) - 1
    ended = [(a, b) for a, b in spans.values() if b is not None]
    span = max(b for _, b in ended) - min(a for a, _ in ended)
    return {"results": len(marks), "trials": len(spans), "steady_results": n, "steady_results_per_s": n / (wall1 - wall0),
            "driver_ms_per_result": 1000 * (cpu1 - cpu0) / n, "main_thread_ms_per_result": 1000 * (main1 - main0) / n,
            "box_busy": (box1[0] - box0[0]) / max(1, box1[1] - box0[1]), "worker_starts": starts,
            "utilisation": sum(b - a for a, b in ended) / (args.gpus * span)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="search.bench --tune-floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--epoch-s", type=float, default=2.0, help="mean sleep of one simulated epoch")
    p.add_argument("--epochs", type=int, default=20, help="epoch budget (ASHA max_t)")
    p.add_argument("--gpus", type=int, default=64, help="logical GPUs = trial slots")
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=4.0, help="stop after this long")
    p.add_argument("--steady-after-s", type=float, default=90.0, help="measure from here (every slot has started)")
    p.add_argument("--no-loggers", action="store_true", help="without Tune's result.json/progress.csv/TensorBoard loggers")
    args = p.parse_args(argv)
    if args.no_loggers:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # launch/local-cluster.sh starts Ray with token auth
    print(f"$ python -m search.bench --tune-floor {' '.join(argv if argv is not None else [])}".rstrip())
    print("SIMULATION: trials sleep; Ray Tune alone (no study, no searcher or callbacks of ours): this measures Tune's orchestration.")
    with tempfile.TemporaryDirectory(prefix="tsb-floor-") as tmp:
        r = run_floor(args, Path(tmp))
    print(f"{r['results']} results from {r['trials']} trials on {args.gpus} slots, mean epoch sleep {args.epoch_s:g} s, "
          f"Tune's loggers {'off' if args.no_loggers else 'on'}; {r['worker_starts']} worker processes started by Ray (the raylet's count); "
          f"slot utilisation {100 * r['utilisation']:.1f} %")
    print(f"  steady state (after {args.steady_after_s:g} s, {r['steady_results']} results): {r['steady_results_per_s']:.1f} results/s "
          f"(ideal {args.gpus / args.epoch_s:.0f}); driver CPU {r['driver_ms_per_result']:.2f} ms per result "
          f"(main thread {r['main_thread_ms_per_result']:.2f} ms); the machine's {os.cpu_count()} CPUs {100 * r['box_busy']:.1f} % busy")
