"""Which Optuna sampler finds a good configuration sooner: the same small real-data sweep per sampler.

    python -m search.bench --samplers [--data DIR] [--trials 12] [--epochs 4] [--resize 64] [--seeds 3]
                                      [--samplers-list tpe,gp,random,qmc] [--data-fraction 1.0]

Each sampler runs the same sweep (``search.run`` with ASHA as usual, ``--seed`` 0..seeds-1, which
seeds the sampler and the trials' training alike) and the best validation Dice found after the
first 4, 8 and 12 trials (in the order they were proposed; trial 0 is the seed recipe for every
sampler) is printed as mean +- std over seeds. ``--data-fraction`` trains and validates on a seeded
part of each split (a smaller, faster benchmark; say so when quoting it). Numbers, not pass/fail.
A finished sweep of an earlier run with the same name is reused, so an interrupted benchmark continues.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from search.rundir import TRIALS_CSV, SweepSettings
from search.tuner import SAMPLERS
from tumorseg.cli import ArgumentParser, parse_int_list

ROOT = Path(__file__).resolve().parents[1]


def coco_fraction(data: Path, out: Path, fraction: float, seed: int = 0) -> Path:
    """A copy of a COCO-layout dataset (Kaggle's) holding a seeded ``fraction`` of each split's images
    (image files linked, not copied)."""
    target = out / f"{data.name}-fraction{fraction:g}"
    for split_dir in sorted(p for p in data.iterdir() if (p / "_annotations.coco.json").is_file()):
        coco = json.loads((split_dir / "_annotations.coco.json").read_text())
        images = sorted(coco["images"], key=lambda image: image["id"])
        kept = random.Random(seed).sample(images, max(1, round(fraction * len(images))))
        ids = {image["id"] for image in kept}
        coco["images"] = kept
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
        (target / split_dir.name).mkdir(parents=True, exist_ok=True)
        for image in kept:
            link = target / split_dir.name / image["file_name"]
            if not link.exists():
                link.symlink_to((split_dir / image["file_name"]).resolve())
        (target / split_dir.name / "_annotations.coco.json").write_text(json.dumps(coco))
    return target


def best_after(table: pd.DataFrame, counts: list[int]) -> dict[int, float]:
    """The best validation Dice among the first ``n`` proposed trials, for each ``n`` (failed trials score 0)."""
    ordered = table.sort_values("trial_index")["best_val_dice"].fillna(0.0).cummax().tolist()
    return {n: ordered[min(n, len(ordered)) - 1] for n in counts}


def run_sweep(data: Path, out: Path, name: str, sampler: str, seed: int, trials: int, epochs: int, resize: int) -> tuple[pd.DataFrame, float]:
    """One sweep (or the finished one already there): its trials table and wall time in seconds."""
    done = out / name / TRIALS_CSV
    if (out / name / "wall_s.txt").is_file():
        return pd.read_csv(done), float((out / name / "wall_s.txt").read_text())
    shutil.rmtree(out / name, ignore_errors=True)  # an interrupted attempt: start that sweep again
    args = ["-m", "search.run", "--data", str(data), "--storage", str(out), "--name", name, "--sampler", sampler,
            "--seed", str(seed), "--num-samples", str(trials), "--epochs", str(epochs), "--resize-choices", str(resize),
            "--encoder-weights", "none", "--no-dashboard", "--no-retrain", "--cpus-per-trial", "1", "--num-workers", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"search.bench --samplers: sweep {name} failed:\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    (out / name / "wall_s.txt").write_text(f"{wall:.1f}")
    return pd.read_csv(done), wall


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {spread:.4f}"


def main(argv=None) -> None:
    p = ArgumentParser(prog="search.bench --samplers", description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("TUMORSEG_DEV_DATA", ROOT.parent / "shared" / "data" / "brain-tumor-dev"))
    p.add_argument("--data", type=Path, default=default_data, help=f"dataset (default: $TUMORSEG_DEV_DATA or {default_data})")
    p.add_argument("--out", type=Path, default=Path("results/bench-samplers"))
    p.add_argument("--samplers-list", default=",".join(SAMPLERS), help="samplers to compare (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--resize", type=int, default=64)
    p.add_argument("--after", type=parse_int_list, default=None, help="trial counts to report (default: 4,8,12 up to --trials)")
    p.add_argument("--data-fraction", type=float, default=1.0, help="a seeded part of every split (a smaller benchmark)")
    args = p.parse_args(argv)
    from search.rundir import package_versions
    from tumorseg.bench import machine

    samplers = [s for s in args.samplers_list.split(",") if s]
    unknown = set(samplers) - set(SAMPLERS)
    if unknown:
        p.error(f"--samplers-list: unknown sampler(s) {', '.join(sorted(unknown))}; choose from {', '.join(SAMPLERS)}")
    counts = args.after or [n for n in (4, 8, 12) if n <= args.trials] or [args.trials]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    data = args.data.resolve()
    if args.data_fraction < 1:
        data = coco_fraction(data, out, args.data_fraction)
    print(f"machine: {machine()} (load average {os.getloadavg()[0]:.1f} at start)\ndata: {data}\n"
          f"versions: optuna {package_versions()['optuna']}, ray {package_versions()['ray']}")
    asha = SweepSettings(name="defaults")  # search.run's ASHA defaults, which every sweep here uses
    print(f"each sweep: {args.trials} trials x <= {args.epochs} epochs at {args.resize} px, from scratch, ASHA with "
          f"grace period {asha.grace_period}, reduction factor {asha.reduction_factor:g}, rung metric {asha.rung_metric}; "
          f"seeds 0..{args.seeds - 1}")
    results, t0 = {}, time.perf_counter()
    for sampler in samplers:
        for seed in range(args.seeds):
            table, wall = run_sweep(data, out, f"samplers-{sampler}-s{seed}", sampler, seed, args.trials, args.epochs, args.resize)
            best = best_after(table, counts)
            results.setdefault(sampler, []).append({"seed": seed, "best_after": best, "wall_s": wall,
                                                    "epochs": int(table["epochs_run"].sum())})
            print(f"  {sampler:6s} seed {seed}: " + "  ".join(f"after {n}: {v:.4f}" for n, v in best.items())
                  + f"  ({int(table['epochs_run'].sum())} epochs, {wall:.0f} s)", flush=True)
    print(f"\nbest validation Dice found after N trials, mean +- std over {args.seeds} seeds ({time.perf_counter() - t0:.0f} s in all):")
    print("| sampler | " + " | ".join(f"after {n}" for n in counts) + " | epochs trained (mean) |")
    print("| --- | " + " | ".join("---" for _ in counts) + " | --- |")
    for sampler, runs in results.items():
        cells = [_mean_std([r["best_after"][n] for r in runs]) for n in counts]
        print(f"| {sampler} | " + " | ".join(cells) + f" | {statistics.mean(r['epochs'] for r in runs):.1f} |")
    (out / "samplers.json").write_text(json.dumps({"settings": vars(args) | {"data": str(data), "out": str(out)}, "results": results},
                                                  indent=2, default=str))
