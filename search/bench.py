"""Sweep benchmarks: where the time goes between the hardware and useful training.

    python -m search.bench [--quick] [--data DIR] [--out results/bench]
    python -m search.bench --samplers [...]   # Optuna's samplers compared (search/bench_samplers.py)

Prints a table (numbers, not pass/fail; targets in brackets):

1. sweep efficiency: the same K fixed configurations (no early stopping) (a) through
   ``search.run`` on S slots and (b) back-to-back in one process without Ray;
   ``overhead = wall(a) * S / sum(trial time in b) - 1`` [<= 15 %], and the median trial start-up
   latency, from Tune starting the trial to its first optimiser step [<= 2 s];
2. input pipeline vs model: images/s of one DataLoader worker (train augmentations, 256 px) beside
   images/s of the training step [loader >= 3x step], and workers needed for ~2000 images/s;
3. early-stopping yield: one seeded set of N configurations run with ASHA and to the full budget:
   epochs consumed and best val Dice [>= 2.5x fewer epochs, best within 0.01];
4. memory: peak RSS of a trial at 256 px batch 16 on CPU, and of a driver holding the dataset in
   the object store, with the store's usage before and after trials read it [each resize once].

``--scale``: the orchestration of 100-2,000 simulated trials on 64 logical GPUs (``search.bench_scale``).
``--tune-floor``: what Ray Tune alone costs per result on the same cluster and sleeps (``search.bench_floor``).
``--data-scale``: the data path at 20,000 slices, object store against node cache (``search.bench_data``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from tumorseg.cli import ArgumentParser

from search.rundir import TRIALS_CSV, TUNE_DIR

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"search.bench: {' '.join(args[:3])} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc


def fixed_space_args(resize: int, lr: float) -> list[str]:
    """A search space with exactly one point: every trial trains the same configuration."""
    return ["--resize-choices", str(resize), "--loss-types", "dice_bce", "--weight-range", "1,1",
            "--lr-range", f"{lr},{lr}", "--warmup-epochs-range", "0,0", "--weight-decay-range", "0.01,0.01"]


def sweep_efficiency(data: Path, out: Path, k: int, slots: int, epochs: int, resize: int, reuse_actors: bool = True) -> dict:
    from search.trainable import load_search_data, run_trial

    name = f"efficiency-{int(time.time())}"
    common = ["--data", str(data), "--storage", str(out), "--encoder-weights", "none", "--no-dashboard",
              "--cpus-per-trial", "1", "--max-concurrent", str(slots), "--num-workers", "0",
              "--reuse-actors" if reuse_actors else "--no-reuse-actors"]
    args = ["-m", "search.run", "--name", name, "--num-samples", str(k), "--epochs", str(epochs),
            "--grace-period", str(epochs), "--no-retrain", *fixed_space_args(resize, 2e-3), *common]
    driver_wall, _ = _run(args)
    run_dir = out / name
    table = pd.read_csv(run_dir / TRIALS_CSV)
    wall_a = table["end_ts"].max() - table["start_ts"].min()
    fresh, reused, pids = [], [], set()
    parts_a = dict.fromkeys(("training", "validation", "checkpoint", "rest"), 0.0)  # summed over trials, seconds
    for row in table.sort_values("start_ts").itertuples():
        lines = [json.loads(line) for line in (run_dir / TUNE_DIR / row.trial_dir / "result.json").read_text().splitlines()]
        first = lines[0]
        # a trial in a process that ran an earlier trial (actor reuse) skips Python + torch start-up
        (reused if first["pid"] in pids else fresh).append(first["first_step_ts"] - row.start_ts)
        pids.add(first["pid"])
        for r in lines:
            known = r.get("train_time_s", 0.0) + r.get("val_time_s", 0.0) + r.get("checkpoint_s", 0.0)
            parts_a["training"] += r.get("train_time_s", 0.0)
            parts_a["validation"] += r.get("val_time_s", 0.0)
            parts_a["checkpoint"] += r.get("checkpoint_s", 0.0)
            parts_a["rest"] += r["time_this_iter_s"] - known  # Tune's report: copying the checkpoint into storage
    parts_a["start-up"] = sum(fresh) + sum(reused)
    idle = wall_a * slots - (table["end_ts"] - table["start_ts"]).sum()  # slot-seconds with no trial

    # (b) the same trials back-to-back in this process, same code path, one thread each
    import torch

    torch.set_num_threads(1)
    params = {"resize_px": resize, "loss_type": "dice_bce", "dice_weight": 1.0, "bce_weight": 1.0, "lr": 2e-3,
              "warmup_epochs": 0, "weight_decay": 0.01}
    base = {"epochs": epochs, "encoder_weights": "none", "num_workers": 0, "seed": 0}
    data_arrays = load_search_data(data, [resize])
    trial_times, reports = [], []
    for _ in range(k):
        t0 = time.perf_counter()
        run_trial(params, base=base, data=data_arrays, report=lambda m, s: reports.append(m))
        trial_times.append(time.perf_counter() - t0)
    parts_b = {"training": sum(m["train_time_s"] for m in reports), "validation": sum(m["val_time_s"] for m in reports)}
    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "k": k, "slots": slots, "epochs": epochs, "resize": resize,
        "wall_a_s": wall_a, "driver_wall_s": driver_wall, "sum_b_s": sum(trial_times),
        "median_trial_b_s": statistics.median(trial_times),
        "overhead": wall_a * slots / sum(trial_times) - 1,
        "startup_median_s": statistics.median(fresh + reused),
        "startup_fresh_s": statistics.median(fresh) if fresh else None,
        "startup_reused_s": statistics.median(reused) if reused else None,
        "parts_a": parts_a, "parts_b": parts_b, "idle_slot_s": idle, "load": os.getloadavg(),
    }


def pipeline_vs_model(data: Path, repeats: int) -> dict:
    from tumorseg.bench import loader_images_per_s, step_images_per_s
    from tumorseg.config import TrainConfig
    from tumorseg.data import load_split

    split = load_split(data, "train", 256)
    cfg = TrainConfig(resize_px=256)
    loader = statistics.median(loader_images_per_s(split, cfg, workers=1) for _ in range(repeats))
    step = statistics.median(step_images_per_s(256, "auto") for _ in range(repeats))
    return {"loader_per_worker": loader, "step": step, "ratio": loader / step,
            "workers_for_2000": math.ceil(2000 / loader)}


def early_stopping_yield(data: Path, out: Path, n: int, epochs: int, resize: int, seed: int) -> dict:
    import optuna

    from search.space import SearchSpace, define_by_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(resize_choices=[resize], lr_range=(3e-4, 1e-2))
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    points = []
    for _ in range(n):
        trial = study.ask()
        define_by_run(space)(trial)
        points.append(trial.params)
        study.tell(trial, 0.0)
    points_file = out / f"points-{seed}.json"
    points_file.write_text(json.dumps(points))
    results = {}
    for label, grace in (("asha", 1), ("full", epochs)):
        name = f"yield-{label}-{int(time.time())}"
        args = ["-m", "search.run", "--data", str(data), "--storage", str(out), "--name", name, "--num-samples", str(n),
                "--epochs", str(epochs), "--grace-period", str(grace), "--reduction-factor", "3", "--rung-metric", "best_val_dice",
                "--points", str(points_file),
                "--resize-choices", str(resize), "--lr-range", "3e-4,1e-2", "--encoder-weights", "none",
                "--no-dashboard", "--no-retrain", "--num-workers", "0", "--seed", str(seed)]
        wall, _ = _run(args)
        table = pd.read_csv(out / name / TRIALS_CSV)
        results[label] = {"epochs": int(table["epochs_run"].sum()), "best": float(table["best_val_dice"].max()), "wall_s": wall}
    results["epoch_ratio"] = results["full"]["epochs"] / max(1, results["asha"]["epochs"])
    results["best_gap"] = results["full"]["best"] - results["asha"]["best"]
    return results


TRIAL_RSS_CODE = """
import resource, sys, torch
from search.trainable import load_search_data, run_trial
torch.set_num_threads(1)
data = load_search_data(sys.argv[1], [256])
params = {"resize_px": 256, "loss_type": "dice_bce", "dice_weight": 0.75, "bce_weight": 1.25, "lr": 1e-4,
          "warmup_epochs": 0, "weight_decay": 0.01}
run_trial(params, base={"epochs": 1, "encoder_weights": "none", "num_workers": 0, "batch_size": 16}, data=data, report=lambda m, s: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

DRIVER_RSS_CODE = """
import re, resource, sys, time, ray
from search.trainable import load_search_data
from ray._private.internal_api import memory_summary
sizes = [int(s) for s in sys.argv[2].split(",")]
data = load_search_data(sys.argv[1], sizes)
nbytes = sum(s.images.nbytes + s.masks.nbytes + (s.native_masks.nbytes if s.native_masks is not None else 0)
             for d in data.values() for s in d.values())
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[3], logging_level="ERROR")
def used():
    text = memory_summary(stats_only=True)
    m = re.search(r"Plasma memory usage (\\d+) MiB", text)
    return float(m.group(1)) if m else float("nan")
ref = ray.put(data)
after_put = used()
@ray.remote(num_cpus=1)
def reader(d):
    time.sleep(2)
    return sum(int(s.images[0, 0, 0]) for v in d.values() for s in v.values())
ray.get([reader.remote(ref) for _ in range(2)])
after_trials = used()
print(nbytes / 2**20, after_put, after_trials, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
ray.shutdown()
"""


def memory(data: Path, sizes: str, out: Path) -> dict:
    _, proc = _run(["-c", TRIAL_RSS_CODE, str(data)])
    trial_mib = float(proc.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="raybench", dir="/tmp") as ray_tmp:
        _, proc = _run(["-c", DRIVER_RSS_CODE, str(data), sizes, ray_tmp], env={"RAY_USAGE_STATS_ENABLED": "0"})
    arrays, after_put, after_trials, driver = (float(v) for v in proc.stdout.strip().splitlines()[-1].split())
    return {"trial_peak_rss_mib": trial_mib, "arrays_mib": arrays, "store_after_put_mib": after_put,
            "store_after_trials_mib": after_trials, "driver_peak_rss_mib": driver, "sizes": sizes}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in argv:  # its own flags: python -m search.bench --scale --help
        from search.bench_scale import main as scale_main

        return scale_main([a for a in argv if a != "--scale"])
    if "--tune-floor" in argv:  # Ray Tune alone on the same cluster and sleeps: python -m search.bench --tune-floor --help
        from search.bench_floor import main as floor_main

        return floor_main([a for a in argv if a != "--tune-floor"])
    if "--data-scale" in argv:  # python -m search.bench --data-scale --help
        from search.bench_data import main as data_main

        return data_main([a for a in argv if a != "--data-scale"])
    if "--samplers" in argv:  # its own benchmark and flags
        from search.bench_samplers import main as samplers_main

        return samplers_main([a for a in argv if a != "--samplers"])
    if "--asha-yield" in argv:  # ASHA's yield over repeated seeds: its own module and flags
        from search.bench_asha import main as asha_yield

        return asha_yield([a for a in argv if a != "--asha-yield"])
    p = ArgumentParser(prog="search.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--asha-yield", action="store_true",
                   help="instead: ASHA's yield repeated over seeds (python -m search.bench --asha-yield --help)")
    p.add_argument("--quick", action="store_true", help="smaller K, N and epochs (about 10 minutes on 2 cores)")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the built-in synthetic set)")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="1,2,3,4", help="which benchmarks to run, e.g. 1,4")
    p.add_argument("--no-reuse-actors", dest="reuse_actors", action="store_false", help="benchmark 1 without actor reuse")
    args = p.parse_args(argv)
    from search.rundir import package_versions
    from tumorseg.bench import machine
    from tumorseg.synthetic import ensure_synthetic

    data = (args.data or ensure_synthetic()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    only = {int(v) for v in args.only.split(",")}
    k, n, epochs = (4, 8, 9) if args.quick else (8, 16, 12)
    print(f"machine: {machine()}\ndata: {data}\nversions: ray {package_versions()['ray']}, optuna {package_versions()['optuna']}")
    results = {}
    if 1 in only:
        r = results["efficiency"] = sweep_efficiency(data, out, k=k, slots=2, epochs=12, resize=96, reuse_actors=args.reuse_actors)
        print(f"1. sweep efficiency, K={r['k']} identical trials of {r['epochs']} epochs at {r['resize']} px, S={r['slots']} slots"
              f"{'' if args.reuse_actors else ', actor reuse off'}:")
        print(f"   (a) search.run: sweep wall {r['wall_a_s']:.1f} s (driver incl. Ray start {r['driver_wall_s']:.1f} s)")
        print(f"   (b) back-to-back without Ray: {r['sum_b_s']:.1f} s in all, median trial {r['median_trial_b_s']:.1f} s")
        print(f"   overhead = wall(a)*S/sum(b) - 1 = {100 * r['overhead']:+.1f} %   [target <= 15 %]")
        split = "".join(f", {label} {r[key]:.2f} s" for label, key in (("new process", "startup_fresh_s"), ("reused process", "startup_reused_s")) if r[key] is not None)
        print(f"   median trial start-up (Tune start -> first optimiser step): {r['startup_median_s']:.2f} s{split}   [target <= 2 s]")
        a, b = r["parts_a"], r["parts_b"]
        print(f"   where the time goes, summed over trials, (a) vs (b): training {a['training']:.1f} vs {b['training']:.1f} s, "
              f"validation {a['validation']:.1f} vs {b['validation']:.1f} s, checkpoints {a['checkpoint']:.1f} s (b: none), "
              f"Tune's report + checkpoint copy {a['rest']:.1f} s, start-up {a['start-up']:.1f} s; slots idle {r['idle_slot_s']:.1f} "
              f"slot-s; load average at the end {' '.join(f'{v:.2f}' for v in r['load'])}")
    if 2 in only:
        r = results["pipeline"] = pipeline_vs_model(data, args.repeats)
        print("2. input pipeline vs model at 256 px, batch 16:")
        print(f"   loader, 1 worker, train augmentations: {r['loader_per_worker']:.0f} images/s; training step: {r['step']:.1f} images/s")
        print(f"   ratio {r['ratio']:.1f}x [target >= 3x]; ~2000 images/s on a GPU needs {r['workers_for_2000']} such workers")
    if 3 in only:
        r = results["yield"] = early_stopping_yield(data, out, n=n, epochs=epochs, resize=64, seed=7)
        print(f"3. early-stopping yield, N={n} seeded configurations, {epochs} epochs at 64 px:")
        print(f"   ASHA: {r['asha']['epochs']} epochs, best val Dice {r['asha']['best']:.4f} ({r['asha']['wall_s']:.0f} s)")
        print(f"   full: {r['full']['epochs']} epochs, best val Dice {r['full']['best']:.4f} ({r['full']['wall_s']:.0f} s)")
        print(f"   {r['epoch_ratio']:.2f}x fewer epochs, best within {r['best_gap']:+.4f}   [target >= 2.5x, within 0.01]")
    if 4 in only:
        sizes = "256" if args.quick else "256,384,512"
        r = results["memory"] = memory(data, sizes, out)
        print("4. memory:")
        print(f"   trial at 256 px, batch 16, CPU: peak RSS {r['trial_peak_rss_mib']:.0f} MiB")
        print(f"   driver with sizes {r['sizes']} in the object store: peak RSS {r['driver_peak_rss_mib']:.0f} MiB; arrays "
              f"{r['arrays_mib']:.1f} MiB; store {r['store_after_put_mib']:.0f} MiB after put, {r['store_after_trials_mib']:.0f} MiB "
              "after two trials read it (held once)")
    (out / "bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
