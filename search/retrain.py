"""The final stage: retrain the best configuration and the seed recipe, ensemble, post-process, test.

    python -m search.retrain RUN_DIR [--retrain-seeds K] [--final-epochs N]

Both recipes get the same final budget (``--final-epochs``, by default ``FINAL_EPOCHS_FACTOR`` x
the trials' ``--epochs``: trials rank, the final training delivers) and the same seeds, each run is
selected by validation Dice, and test is touched once per run at the end, so ``final/metrics.json``
shows the gain of the search honestly. The K seeds of a recipe then form an ensemble (mean of
probabilities) and post-processing is chosen on validation (``search.finalize``). Where the search
space excludes the seed recipe's resize (256), it takes the nearest allowed size and the outputs say so.

Each (recipe, seed) run lands in ``final/<recipe>/<key>/seed<k>/`` by an atomic rename when
complete; ``key`` (``search.rundir.run_key``) hashes its configuration without the seed and the data
fingerprint. An interrupted retrain resumes with only the missing runs, and a changed best
configuration, budget or dataset gets a new key: runs of another key are never reused or averaged.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.config import TrainConfig
from tumorseg.errors import UserError

from search.rundir import FINAL_DIR, FINAL_EPOCHS_FACTOR, load_sweep, read_best_params, run_key
from search.space import seed_point

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


def recipe_config(base: dict, params: dict, epochs: int, k: int) -> TrainConfig:
    """The TrainConfig of seed ``k`` of a recipe: the sweep's fixed settings, the recipe, the final budget."""
    return TrainConfig.from_dict({**base, **params, "seed": base["seed"] + k, "epochs": epochs})


def run_done(out: Path, cfg: TrainConfig) -> bool:
    """A finished run of exactly ``cfg`` (the key says so already; the recorded config double-checks)."""
    try:
        return json.loads((out / "metrics.json").read_text())["config"] == cfg.to_dict()
    except (OSError, ValueError, KeyError):
        return False


def retrain(run_dir: Path, seeds: int | None = None, final_epochs: int | None = None, log=print) -> dict:
    """Run what is missing under ``run_dir/final``, then ``search.finalize``; returns ``final/metrics.json``."""
    from tumorseg.data import load_dataset
    from tumorseg.model import load_encoder_state
    from tumorseg.engine import train
    from tumorseg.train import write_run_outputs

    from search.finalize import finalize, format_summary

    run_dir = Path(run_dir)
    settings, _, base, _ = load_sweep(run_dir)
    seeds = seeds or settings.retrain_seeds
    epochs = final_epochs or settings.retrain_epochs()
    todo, notes = recipes(run_dir)
    if "best" not in todo:
        log("retrain: no successful trial, so only the seed recipe is retrained")
    final = run_dir / FINAL_DIR
    final.mkdir(exist_ok=True)
    dataset = settings.open_dataset()  # the sweep's splits.json, when it carved
    log(f"retrain: data {dataset.info.describe()}; {seeds} seed(s) x {epochs} epochs per recipe "
        f"(trials ran <= {settings.epochs})")
    encoder_states, data_by_size, runs = {}, {}, {}
    t0 = time.perf_counter()
    for recipe, params in todo.items():
        key = run_key(recipe_config(base, params, epochs, 0).to_dict(), dataset.info.fingerprint)
        runs[recipe] = [final / recipe / key / f"seed{k}" for k in range(seeds)]
        for k, out in enumerate(runs[recipe]):
            cfg = recipe_config(base, params, epochs, k)
            if run_done(out, cfg):
                log(f"retrain: {recipe} seed {k} already done ({recipe}/{key})")
                continue
            if cfg.encoder not in encoder_states:
                encoder_states[cfg.encoder] = load_encoder_state(base["encoder_weights"], cfg.encoder)
            if cfg.resize_px not in data_by_size:
                data_by_size[cfg.resize_px] = load_dataset(dataset, cfg.resize_px, cache_dir=settings.cache_dir)
            data = data_by_size[cfg.resize_px]
            log(f"retrain: {recipe} seed {k}: {params}, {cfg.epochs} epochs -> {recipe}/{key}/seed{k}")
            started = time.perf_counter()
            result = train(cfg, data, encoder_state=encoder_states[cfg.encoder], log=log, progress=True)
            train_wall_s = time.perf_counter() - started
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            metrics, counts = write_run_outputs(tmp, result, cfg, data["test"], dataset.info)
            (tmp / "metrics.json").write_text(json.dumps({**metrics, "train_wall_s": train_wall_s}, indent=2))
            write_per_image(tmp, result.model, data["test"], cfg, counts)
            shutil.rmtree(out, ignore_errors=True)  # a run of another config (never: the key hashes it), if any
            tmp.rename(out)  # complete runs only: an interrupted retrain redoes just this one
    retrain_wall_s = time.perf_counter() - t0
    summary = finalize(run_dir, dataset, todo, runs, notes, settings, retrain_wall_s, log=log)
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


def main(argv=None) -> None:
    p = ArgumentParser(prog="search.retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--retrain-seeds", type=int, default=None, help="seeds per recipe (default: the sweep's)")
    p.add_argument("--final-epochs", type=int, default=None,
                   help=f"epochs of each retrain run (default: the sweep's --final-epochs, else {FINAL_EPOCHS_FACTOR} x its --epochs)")
    args = p.parse_args(argv)
    with exit_on_user_error("search.retrain"):
        for flag in ("retrain_seeds", "final_epochs"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
        if not args.run_dir.is_dir():
            raise UserError(f"run folder not found: {args.run_dir}")
        try:
            retrain(args.run_dir, args.retrain_seeds, args.final_epochs)
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished runs are kept; rerun python -m search.retrain {args.run_dir} to do the rest",
                  file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
