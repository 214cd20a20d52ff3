"""Retrain the best configuration and the seed recipe, then score each once on the test split.

    python -m search.retrain RUN_DIR [--retrain-seeds K]

Both recipes get the sweep's full epoch budget and the same seeds, each run is selected by
validation Dice, and test is touched once per run at the end, so ``final/metrics.json`` shows the
gain of the search honestly (mean and std over seeds). Where the search space excludes the seed
recipe's resize (256), it takes the nearest allowed size and the outputs say so.

Each (recipe, seed) run lands in ``final/<recipe>/seed<k>/`` by an atomic rename when complete,
so an interrupted retrain resumes with only the missing runs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.config import TrainConfig
from tumorseg.errors import UserError

from search.rundir import FINAL_DIR, load_sweep, read_best_params
from search.space import seed_point

METRICS = ("dice", "iou", "precision", "recall", "f1", "dice_loss")
OVERLAYS = ("best", "median", "worst")


def recipes(run_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """``{"best": params, "seed_recipe": params}`` (best omitted when no trial succeeded)."""
    _, space, _, _ = load_sweep(run_dir)
    point, notes = seed_point(space)
    found = {}
    best = read_best_params(run_dir)
    if best is not None:
        found["best"] = best
    found["seed_recipe"] = point
    return found, notes


def retrain(run_dir: Path, seeds: int | None = None, log=print) -> dict:
    """Run what is missing under ``run_dir/final`` and write ``final/metrics.json``."""
    from tumorseg.data import load_dataset
    from tumorseg.model import load_encoder_state
    from tumorseg.engine import train
    from tumorseg.train import write_run_outputs

    run_dir = Path(run_dir)
    settings, _, base, _ = load_sweep(run_dir)
    seeds = seeds or settings.retrain_seeds
    todo, notes = recipes(run_dir)
    if "best" not in todo:
        log("retrain: no successful trial, so only the seed recipe is retrained")
    final = run_dir / FINAL_DIR
    final.mkdir(exist_ok=True)
    dataset, encoder_states, data_by_size = None, {}, {}
    for recipe, params in todo.items():
        for k in range(seeds):
            out = final / recipe / f"seed{k}"
            if (out / "metrics.json").is_file():
                log(f"retrain: {recipe} seed {k} already done")
                continue
            if dataset is None:
                dataset = settings.open_dataset()  # the sweep's splits.json, when it carved
                log(f"retrain: data {dataset.info.describe()}")
            cfg = TrainConfig.from_dict({**base, **params, "seed": base["seed"] + k, "epochs": settings.epochs})
            if cfg.encoder not in encoder_states:
                encoder_states[cfg.encoder] = load_encoder_state(base["encoder_weights"], cfg.encoder)
            if cfg.resize_px not in data_by_size:
                data_by_size[cfg.resize_px] = load_dataset(dataset, cfg.resize_px, cache_dir=settings.cache_dir)
            data = data_by_size[cfg.resize_px]
            log(f"retrain: {recipe} seed {k}: {params}, {cfg.epochs} epochs")
            result = train(cfg, data, encoder_state=encoder_states[cfg.encoder], log=log, progress=True)
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            _, counts = write_run_outputs(tmp, result, cfg, data["test"], dataset.info)
            write_per_image(tmp, result.model, data["test"], cfg, counts)
            tmp.rename(out)  # complete runs only: an interrupted retrain redoes just this one
    summary = summarize(final, todo, notes)
    log(format_summary(summary))
    return summary


def write_per_image(out: Path, model, split, cfg, counts: np.ndarray) -> None:
    """Per-image test Dice and the best / median / worst overlays (the report shows them).

    ``counts``: the per-image counts of the run's one test pass (``write_run_outputs``).
    """
    import pandas as pd

    from tumorseg.metrics import dice_per_image, iou_per_image
    from tumorseg.visualize import prediction_tiles

    dice = dice_per_image(counts)
    pd.DataFrame({"file_name": split.file_names, "dice": dice, "iou": iou_per_image(counts)}).to_csv(out / "test_per_image.csv", index=False)
    order = np.argsort(-dice, kind="stable")
    picks = {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}
    labels = [f"{name}: dice {dice[i]:.2f} {split.file_names[i]}" for name, i in picks.items()]
    for (name, _), tile in zip(picks.items(), prediction_tiles(model, split, cfg, list(picks.values()), labels)):
        tile.resize((320, 320)).save(out / f"overlay_{name}.png")


def summarize(final: Path, todo: dict, notes: list[str]) -> dict:
    """Mean and std over seeds of each recipe's test (and val) metrics; the best model copied up."""
    summary = {"metric_definitions": "see tumorseg/metrics.py", "notes": notes}
    for recipe, params in todo.items():
        runs = sorted((final / recipe).glob("seed*/metrics.json"))
        if not runs:
            continue
        loaded = [json.loads(p.read_text()) for p in runs]
        summary.setdefault("dataset", loaded[0].get("dataset"))  # every run of a sweep is on the same data
        if loaded[0].get("seed_reported_test"):  # present only on the Kaggle data
            summary.setdefault("seed_reported_test", loaded[0]["seed_reported_test"])
        summary[recipe] = {
            "params": params,
            "seeds": [m["config"]["seed"] for m in loaded],
            "epochs": loaded[0]["config"]["epochs"],
            "resize_px": loaded[0]["config"]["resize_px"],
            "test": {k: _mean_std([m["test"][k] for m in loaded]) for k in METRICS},
            "valid": {k: _mean_std([m["valid"][k] for m in loaded]) for k in METRICS},
        }
    top = "best" if "best" in summary else "seed_recipe"
    if top in summary:
        runs = sorted((final / top).glob("seed*/metrics.json"))
        chosen = max(runs, key=lambda p: json.loads(p.read_text())["valid"]["dice"]).parent  # by val, never test
        for name in ["model.pt", "predictions.png", "test_per_image.csv"] + [f"overlay_{o}.png" for o in OVERLAYS]:
            if (chosen / name).is_file():
                shutil.copyfile(chosen / name, final / name)
        summary["final_model"] = {"recipe": top, "run": str(chosen.relative_to(final))}
    (final / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": arr.tolist()}


def format_summary(summary: dict) -> str:
    dataset = summary.get("dataset") or {}
    seeds = max((len(summary[r]["seeds"]) for r in ("best", "seed_recipe") if r in summary), default=1)
    on = f"on {dataset.get('name', '?')} ({dataset.get('layout', '?')}, fingerprint {dataset.get('fingerprint', '?')})"
    lines = [f"test metrics (mean +- std over seeds) {on}:" if seeds > 1 else f"test metrics (one seed) {on}:"]
    for recipe in ("best", "seed_recipe"):
        if recipe in summary:
            t = summary[recipe]["test"]
            spread = (lambda k: f" +- {t[k]['std']:.4f}") if len(summary[recipe]["seeds"]) > 1 else (lambda k: "")
            lines.append(f"  {recipe:12s} " + "  ".join(f"{k} {t[k]['mean']:.4f}{spread(k)}" for k in ("dice", "f1", "precision", "recall")))
    s = summary.get("seed_reported_test")
    if s:
        lines.append(f"  {'seed report':12s} f1 {s['f1']}  precision {s['precision']}  recall {s['recall']}  "
                     "(measured on Kaggle's own test split at 256 px)")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = ArgumentParser(prog="search.retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--retrain-seeds", type=int, default=None, help="seeds per recipe (default: the sweep's)")
    args = p.parse_args(argv)
    with exit_on_user_error("search.retrain"):
        if args.retrain_seeds is not None and args.retrain_seeds <= 0:
            raise UserError(f"--retrain-seeds must be > 0, got {args.retrain_seeds}")
        if not args.run_dir.is_dir():
            raise UserError(f"run folder not found: {args.run_dir}")
        try:
            retrain(args.run_dir, args.retrain_seeds)
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished runs are kept; rerun python -m search.retrain {args.run_dir} to do the rest",
                  file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
