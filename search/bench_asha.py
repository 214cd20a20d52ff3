"""ASHA's yield over repeats: how many fewer epochs, and how much of the best lost, seed by seed.

    python -m search.bench --asha-yield [--seeds 5] [--data DIR] [--out results/bench-asha]

Why one run says little: asynchronous ASHA judges a trial the moment it reaches a rung, against the
trials that reached that rung before it (the first one always passes, a late one meets a full rung),
so what it stops depends on the order trials arrive in; and a trial whose warmup is still running
at the grace period is judged on a learning rate it has not reached yet.

Per seed (0 .. --seeds - 1):

1. N configurations drawn by Optuna's ``RandomSampler(seed)``, the same N in every arm
   (``search.run --points``), trained with ``--seed seed``. Not TPE: TPE's later proposals depend on
   the scores ASHA let it see, so the arms would not compare like with like.
2. The full-budget arm: ``search.run`` without early stopping (grace period = epochs); every
   trial's learning curve and epoch times are read back from Tune's result files.
3. ASHA replayed: Ray's own ``ASHAScheduler`` is fed those curves in simulated time (``--slots``
   trials at once, started in order, each epoch as long as it took), for every setting of
   ``--settings``: epochs used and the best val Dice reached. Then again under ``--orders`` random
   timings (each epoch's time x lognormal(0, ``--jitter``)): the timing noise of real runs.
4. ``--check``: real ASHA sweeps on the first ``--check-seeds`` seeds. Their curves must equal the
   full arm's (a configuration trains deterministically per seed) and the replay fed their own
   order of events must stop the same trials at the same epochs (the replay is faithful).

Data: a seeded subset of ``--data`` (``--train-images``, ``--valid-images``, written as a COCO folder
of links), so seeds x N x epochs fit a shared 2-core CPU box. Full arms are kept in ``--out`` and
reused by a rerun with the same sizes (only the replays are recomputed).
"""

from __future__ import annotations

import heapq
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from tumorseg.cli import ArgumentParser
from tumorseg.coco import ANNOTATIONS
from tumorseg.errors import ConfigError

from search.rundir import TRIALS_CSV, TUNE_DIR

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"best": "best_val_dice", "last": "val_dice"}  # the rung metric: best so far, or this epoch's
RESIZE_PX = 64
WITHIN = 0.01  # "the best is within 0.01" of the full budget's best
DEFAULT_SETTINGS = ",".join(f"{g}:{rf}:{m}" for g in (1, 2, 3) for rf in (2, 3, 4) for m in ("best", "last"))


# ----------------------------------------------------------------------------- the inputs


def write_subset(src: Path, out: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """A COCO folder holding ``counts[split]`` images of each split of the COCO folder ``src`` (links, not copies)."""
    rng = random.Random(seed)
    for split, k in counts.items():
        coco = json.loads((src / split / ANNOTATIONS).read_text())
        images = sorted(coco["images"], key=lambda im: im["id"])
        if k > len(images):
            raise ConfigError(f"--{split}-images {k}: {src / split} has only {len(images)} images")
        chosen = sorted(rng.sample(images, k), key=lambda im: im["id"])
        ids = {im["id"] for im in chosen}
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        subset = {**coco, "images": chosen, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
        (folder / ANNOTATIONS).write_text(json.dumps(subset))
        for image in chosen:
            link = folder / image["file_name"]
            if not link.is_symlink():
                link.symlink_to((src / split / image["file_name"]).resolve())
    return out


def sample_points(n: int, seed: int, warmup_max: int) -> list[dict]:
    """``n`` configurations of the 64 px space (warmups 0..warmup_max), drawn by Optuna's RandomSampler."""
    import optuna

    from search.space import SearchSpace, define_by_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(resize_choices=[RESIZE_PX], warmup_epochs_range=(0, warmup_max))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        define_by_run(space)(trial)
        points.append(trial.params)
        study.tell(trial, 0.0)
    return points


# ----------------------------------------------------------------------------- the arms


def run_arm(args, data: Path, name: str, points_file: Path, seed: int, grace: int, rf: float,
            rung_metric: str = "best_val_dice") -> Path:
    """One ``search.run`` sweep of the points: reused when a finished one of that name is in
    ``--out``, continued (``search.run --resume``) when an interrupted one is."""
    import pandas as pd

    run_dir = args.out / name
    if (run_dir / TRIALS_CSV).is_file():
        table = pd.read_csv(run_dir / TRIALS_CSV)
        if len(table) == args.trials and table["status"].isin(["COMPLETED", "STOPPED_EARLY", "FAILED"]).all():
            print(f"  reusing {run_dir}")
            return run_dir
    resume = (run_dir / "sweep.json").is_file() and (run_dir / TUNE_DIR).is_dir()
    with tempfile.TemporaryDirectory(prefix="ray-asha-", dir="/tmp") as ray_tmp:
        cmd = [sys.executable, "-m", "search.run", "--storage", str(args.out), "--name", name, "--no-retrain",
               "--ray-temp-dir", ray_tmp]
        cmd += ["--resume"] if resume else [
            "--data", str(data), "--num-samples", str(args.trials), "--epochs", str(args.epochs), "--grace-period", str(grace),
            "--reduction-factor", f"{rf:g}", "--rung-metric", rung_metric, "--points", str(points_file), "--seed", str(seed),
            "--resize-choices", str(RESIZE_PX), "--warmup-epochs-range", f"0,{args.warmup_max}",
            "--batch-size", str(args.batch_size), "--encoder-weights", "none", "--cpus-per-trial", "1",
            "--max-concurrent", str(args.slots), "--num-workers", "0", "--no-dashboard"]
        print("  $ python " + " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        # A reused trial process waits TUNE_FUNCTION_THREAD_TIMEOUT_S (Ray's default: 2 s) for the
        # previous trial's thread; on a loaded machine that is too short and the trial ends ERROR
        env = {**os.environ, "TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"search.bench: {name} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}")
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = pd.read_csv(run_dir / TRIALS_CSV)
    bad = table[~table["status"].isin(["COMPLETED", "STOPPED_EARLY", "FAILED"])]
    if len(bad):  # a crashed trial has no curve to compare
        row = bad.iloc[0]
        raise SystemExit(f"search.bench: {name}: trial_{row['trial_index']:03d} ended {row['status']} ({row['failure_reason']}); "
                         "rerun the same command to redo this arm")
    return run_dir


def read_curves(run_dir: Path) -> list[dict]:
    """Per trial (in index order): its per-epoch ``val_dice`` / ``best_val_dice``, epoch times and
    report times (``trial_start_ts + time_total_s``), and whether it failed."""
    import pandas as pd

    table = pd.read_csv(run_dir / TRIALS_CSV).sort_values("trial_index")
    curves = []
    for row in table.itertuples():
        records = [json.loads(line) for line in (run_dir / TUNE_DIR / row.trial_dir / "result.json").read_text().splitlines()]
        by_epoch = {r["epoch"]: r for r in records if r.get("epoch", 0) > 0 and not r.get("failure_reason")}
        epochs = [by_epoch[e] for e in sorted(by_epoch)]  # a resumed trial may report an epoch twice: the last counts
        curves.append({
            "index": int(row.trial_index), "status": row.status, "failed": row.status == "FAILED",
            "warmup_epochs": int(row.warmup_epochs), "lr": float(row.lr),
            "val_dice": [r["val_dice"] for r in epochs], "best_val_dice": [r["best_val_dice"] for r in epochs],
            "epoch_s": [r["time_this_iter_s"] for r in epochs],
            "report_ts": [r["trial_start_ts"] + r["time_total_s"] for r in epochs],
        })
    return curves


# ----------------------------------------------------------------------------- the replay


def _scheduler(epochs: int, grace: int, rf: float, metric: str):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=metric, mode="max", max_t=epochs, grace_period=grace, reduction_factor=rf)


def _outcome(curves: list[dict], used: list[int]) -> dict:
    best = max((c["best_val_dice"][u - 1] for c, u in zip(curves, used) if u and not c["failed"]), default=0.0)
    return {"epochs": sum(used), "best": best, "used": list(used)}


def replay(curves: list[dict], *, epochs: int, grace: int, rf: float, metric: str, slots: int,
           epoch_s: list[list[float]] | None = None) -> dict:
    """Ray's ``ASHAScheduler`` fed ``curves`` in simulated time: ``slots`` trials at once, started in
    index order, epoch ``k`` of trial ``i`` taking ``epoch_s[i][k]`` (default: as measured).

    Returns ``{"epochs": total used, "best": best val Dice reached, "used": epochs per trial}``.
    """
    scheduler = _scheduler(epochs, grace, rf, metric)
    epoch_s = epoch_s or [c["epoch_s"] for c in curves]
    trials = [SimpleNamespace(trial_id=str(i)) for i in range(len(curves))]
    used = [0] * len(curves)
    events: list[tuple[float, int, int]] = []  # (finish time, trial, epoch)
    waiting = iter(range(len(curves)))

    def start(now: float) -> None:
        i = next(waiting, None)
        if i is not None:
            scheduler.on_trial_add(None, trials[i])
            heapq.heappush(events, (now + epoch_s[i][0], i, 1))

    for _ in range(slots):
        start(0.0)
    while events:
        now, i, epoch = heapq.heappop(events)
        used[i] = epoch
        result = {"epoch": epoch, metric: curves[i][metric][epoch - 1]}
        if scheduler.on_trial_result(None, trials[i], result) == "STOP" or epoch == len(curves[i][metric]):
            scheduler.on_trial_complete(None, trials[i], result)
            start(now)
        else:
            heapq.heappush(events, (now + epoch_s[i][epoch], i, epoch + 1))
    return _outcome(curves, used)


def replay_in_order(curves: list[dict], order: list[tuple[int, int]], *, epochs: int, grace: int, rf: float,
                    metric: str) -> dict:
    """Ray's ``ASHAScheduler`` fed ``curves`` in the given order of (trial, epoch) reports (a real run's);
    reports of a trial after the replay stopped it are skipped (a real run would not have them)."""
    scheduler = _scheduler(epochs, grace, rf, metric)
    trials = [SimpleNamespace(trial_id=str(i)) for i in range(len(curves))]
    used, stopped, added = [0] * len(curves), set(), set()
    for i, epoch in order:
        if i in stopped:
            continue
        if i not in added:
            scheduler.on_trial_add(None, trials[i])
            added.add(i)
        used[i] = epoch
        result = {"epoch": epoch, metric: curves[i][metric][epoch - 1]}
        if scheduler.on_trial_result(None, trials[i], result) == "STOP":
            scheduler.on_trial_complete(None, trials[i], result)
            stopped.add(i)
    return _outcome(curves, used)


def jittered(curves: list[dict], sigma: float, rng: random.Random) -> list[list[float]]:
    return [[s * rng.lognormvariate(0.0, sigma) for s in c["epoch_s"]] for c in curves]


# ----------------------------------------------------------------------------- the numbers


def parse_settings(text: str) -> list[tuple[int, float, str]]:
    """``"2:3:best,1:3:last"`` -> ``[(2, 3.0, "best"), (1, 3.0, "last")]`` (grace:reduction factor:rung metric)."""
    out = []
    for item in text.split(","):
        try:
            grace, rf, metric = item.split(":")
            METRICS[metric]
            out.append((int(grace), float(rf), metric))
        except (ValueError, KeyError):
            raise ConfigError(f"--settings {item!r}: expected GRACE:RF:METRIC with METRIC one of {', '.join(METRICS)}") from None
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Median and worst of the fewer-epochs factor and of the best lost, and seeds within ``WITHIN``."""
    factors = [s["factor"] for s in per_seed]
    losses = [s["lost"] for s in per_seed]
    return {"factor_median": statistics.median(factors), "factor_worst": min(factors),
            "lost_median": statistics.median(losses), "lost_worst": max(losses),
            "seeds_within": sum(loss <= WITHIN for loss in losses), "seeds": len(per_seed),
            "orders_within": statistics.mean(s["orders_within"] for s in per_seed),
            "orders_factor_median": statistics.median(f for s in per_seed for f in s["orders_factors"])}


def evaluate_setting(arms: dict[int, list[dict]], setting: tuple[int, float, str], args) -> dict:
    """One ASHA setting replayed on every seed's full-budget curves (measured timing and jittered orders)."""
    grace, rf, metric = setting
    per_seed = []
    for seed, curves in arms.items():
        full = _outcome(curves, [len(c["val_dice"]) for c in curves])
        kwargs = {"epochs": args.epochs, "grace": grace, "rf": rf, "metric": METRICS[metric], "slots": args.slots}
        asha = replay(curves, **kwargs)
        rng = random.Random(1000 + seed)
        orders = [replay(curves, **kwargs, epoch_s=jittered(curves, args.jitter, rng)) for _ in range(args.orders)]
        top = max(range(len(curves)), key=lambda i: curves[i]["best_val_dice"][-1] if not curves[i]["failed"] else -1)
        per_seed.append({
            "seed": seed, "full_epochs": full["epochs"], "full_best": full["best"], "epochs": asha["epochs"],
            "top_trial": top, "top_warmup": curves[top]["warmup_epochs"], "top_used": asha["used"][top],
            "best": asha["best"], "used": asha["used"], "factor": full["epochs"] / asha["epochs"],
            "lost": full["best"] - asha["best"],
            "orders_within": sum(full["best"] - o["best"] <= WITHIN for o in orders) / max(1, len(orders)),
            "orders_factors": [full["epochs"] / o["epochs"] for o in orders],
        })
    return {"grace": grace, "rf": rf, "metric": metric, "per_seed": per_seed, **summarize(per_seed)}


def check_real(args, data: Path, seed: int, points_file: Path, full: list[dict], setting: tuple[int, float, str]) -> dict:
    """A real ASHA sweep against the replay: same curves, same decisions in its own order of events."""
    grace, rf, metric = setting
    run_dir = run_arm(args, data, f"asha-g{grace}-rf{rf:g}-{metric}-{arm_tag(args, seed)}", points_file, seed, grace, rf,
                      METRICS[metric])
    real = read_curves(run_dir)
    diff = max((abs(a - b) for r, f in zip(real, full) for a, b in zip(r["val_dice"], f["val_dice"])), default=0.0)
    order = sorted((ts, c["index"], e + 1) for c in real for e, ts in enumerate(c["report_ts"]))
    kwargs = {"epochs": args.epochs, "grace": grace, "rf": rf, "metric": METRICS[metric]}
    in_order = replay_in_order(full, [(i, e) for _, i, e in order], **kwargs)
    predicted = replay(full, **kwargs, slots=args.slots)
    real_used = [len(c["val_dice"]) for c in real]
    return {"seed": seed, "grace": grace, "rf": rf, "metric": metric, "max_curve_diff": diff,
            "real": _outcome(real, real_used), "replay_in_real_order": in_order, "replay_measured_timing": predicted,
            "decisions_match": in_order["used"] == real_used}


def arm_tag(args, seed: int) -> str:
    return f"s{seed}-n{args.trials}-e{args.epochs}-w{args.warmup_max}-t{args.train_images}-v{args.valid_images}-b{args.batch_size}"


# ----------------------------------------------------------------------------- the command


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="search.bench --asha-yield", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="repeats (seeds 0..S-1), each its own configurations (default 5)")
    p.add_argument("--trials", type=int, default=8, help="configurations per seed (default 8)")
    p.add_argument("--epochs", type=int, default=8, help="the full budget, ASHA's max_t (default 8)")
    p.add_argument("--warmup-max", type=int, default=2, help="warmups drawn from 0..this (default 2: the default sweep's range)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("TUMORSEG_DEV_DATA", ROOT.parent / "shared" / "data" / "brain-tumor-dev")),
                   help="a COCO dataset folder (default: $TUMORSEG_DEV_DATA)")
    p.add_argument("--train-images", type=int, default=32, help="train images of the subset (default 32)")
    p.add_argument("--valid-images", type=int, default=32, help="validation images of the subset (default 32)")
    p.add_argument("--batch-size", type=int, default=4, help="(default 4: 8 steps an epoch on 32 images)")
    p.add_argument("--slots", type=int, default=2, help="trials at once, real and replayed (default 2)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="GRACE:RF:METRIC,... replayed (METRIC best|last)")
    p.add_argument("--orders", type=int, default=200, help="jittered timings replayed per seed and setting (default 200)")
    p.add_argument("--jitter", type=float, default=0.25, help="sigma of the lognormal factor on each epoch's time (default 0.25)")
    p.add_argument("--check", default="", help="GRACE:RF:best,... run for real on the first --check-seeds seeds")
    p.add_argument("--check-seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/bench-asha"))
    return p


def print_table(results: list[dict], args) -> None:
    print(f"\nreplayed ASHA, {args.seeds} seeds x {args.trials} configurations x {args.epochs} epochs "
          f"({args.slots} slots; 'orders': {args.orders} jittered timings per seed):")
    print("  grace  rf  rung metric    fewer epochs median / worst   best lost median / worst   seeds within 0.01   "
          "orders within 0.01   orders' median factor")
    for r in results:
        print(f"  {r['grace']:5d}  {r['rf']:2g}  {METRICS[r['metric']]:13s}  {r['factor_median']:12.2f}x / {r['factor_worst']:.2f}x"
              f"   {r['lost_median']:14.4f} / {r['lost_worst']:.4f}   {r['seeds_within']:9d} of {r['seeds']}"
              f"   {100 * r['orders_within']:15.0f} %   {r['orders_factor_median']:16.2f}x")


def print_seeds(result: dict) -> None:
    print(f"\nper seed, grace {result['grace']} rf {result['rf']:g} rung metric {METRICS[result['metric']]}:")
    for s in result["per_seed"]:
        print(f"  seed {s['seed']}: full {s['full_epochs']} epochs best {s['full_best']:.4f}; ASHA {s['epochs']} epochs "
              f"({s['factor']:.2f}x fewer) best {s['best']:.4f} (lost {s['lost']:+.4f}); epochs per trial {s['used']}; "
              f"the full budget's best, trial {s['top_trial']} (warmup {s['top_warmup']}), got {s['top_used']} epochs")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    settings, checks = parse_settings(args.settings), parse_settings(args.check) if args.check else []
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_subset(args.data, args.out / f"data-t{args.train_images}-v{args.valid_images}",
                        {"train": args.train_images, "valid": args.valid_images, "test": 16})
    from tumorseg.bench import machine

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start\ndata: {args.data} -> subset {data} "
          f"(train {args.train_images}, valid {args.valid_images} images), {RESIZE_PX} px, batch {args.batch_size}")
    t0 = time.perf_counter()
    arms, points_files = {}, {}
    for seed in range(args.seeds):
        points_files[seed] = args.out / f"points-{arm_tag(args, seed)}.json"
        points_files[seed].write_text(json.dumps(sample_points(args.trials, seed, args.warmup_max)))
        run_dir = run_arm(args, data, f"full-{arm_tag(args, seed)}", points_files[seed], seed, args.epochs, 3)
        arms[seed] = read_curves(run_dir)
        print(f"  seed {seed}: " + "  ".join(f"w{c['warmup_epochs']} lr {c['lr']:.0e}: "
                                              + ",".join(f"{v:.2f}" for v in c["val_dice"]) for c in arms[seed]))
    print(f"full-budget arms: {time.perf_counter() - t0:.0f} s")
    results = [evaluate_setting(arms, s, args) for s in settings]
    print_table(results, args)
    for r in results:
        if r["seeds_within"] >= args.seeds - 1 and r["factor_worst"] >= 2:
            print_seeds(r)
    checked = [check_real(args, data, seed, points_files[seed], arms[seed], s) for s in checks for seed in range(args.check_seeds)]
    for c in checked:
        print(f"\nreal ASHA sweep, seed {c['seed']}, grace {c['grace']} rf {c['rf']:g}: {c['real']['epochs']} epochs, best "
              f"{c['real']['best']:.4f}, epochs per trial {c['real']['used']}")
        print(f"  curves vs the full arm: max |val_dice difference| {c['max_curve_diff']:.2g}")
        print(f"  replay in the real run's order: epochs per trial {c['replay_in_real_order']['used']} "
              f"({'the same decisions' if c['decisions_match'] else 'DIFFERENT decisions'})")
        print(f"  replay with the full arm's timing: {c['replay_measured_timing']['epochs']} epochs, best "
              f"{c['replay_measured_timing']['best']:.4f}, epochs per trial {c['replay_measured_timing']['used']}")
    (args.out / "asha_yield.json").write_text(json.dumps({"settings": results, "checks": checked,
                                                          "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at end")
