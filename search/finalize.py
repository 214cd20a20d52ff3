"""After the retrain runs: seed ensembles, post-processing chosen on validation, baselines, the shipped model.

For each recipe (``best``, ``seed_recipe``) and the K runs of its current key (``search.retrain``):

- **per seed**: each run's own test metrics (its one test pass), mean +- std over the seeds;
- **ensemble**: the mean of the K members' probabilities at native size
  (``tumorseg.inference.predict_probabilities``), thresholded at the configuration's threshold;
- **ensemble + post-processing**: the pipeline ``tumorseg.postprocess.select_postprocess`` chooses
  on the validation split (from the ensemble's probabilities with and without flip TTA), applied
  once to test.

Both recipes get the same treatment, so the comparison stays fair. The trivial baselines (all
background; the training masks' mean box, ``tumorseg.inspect_data``) are scored on the same test
split. The shipped recipe is chosen on validation too (``choose_shipped``): the sweep's ``best``
unless the seed recipe's ensemble with its post-processing beats it there by more than ``MARGIN``
(trials rank configurations on a short budget; at the final budget the order can change). Its
members go to ``final/model/member<k>.pt`` (hard links to the runs' ``model.pt`` where the file system allows),
its pipeline to ``final/postprocess.json``, and the pictures and ``test_per_image.csv`` in
``final/`` show its post-processed test predictions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from search.rundir import FINAL_DIR, FINAL_MODEL_DIR, write_json
from tumorseg.postprocess import (
    MARGIN,
    POSTPROCESS_JSON,
    PostProcess,
    apply_postprocess,
    labels_are_boxes,
    member_file,
    save_postprocess,
    select_postprocess,
)

METRICS = ("dice", "iou", "precision", "recall", "f1", "dice_loss")  # per seed (each run's metrics.json)
SHOWN = ("dice", "f1", "precision", "recall")  # the terminal's columns


def finalize(run_dir: Path, dataset, todo: dict[str, dict], runs: dict[str, list[Path]], notes: list[str],
             settings, retrain_wall_s: float, log=print) -> dict:
    """Score every recipe's runs, ship the chosen recipe, write and return ``final/metrics.json``."""
    from tumorseg.data import sample_mask
    from tumorseg.train import seed_reported_row

    t0 = time.perf_counter()
    final = Path(run_dir) / FINAL_DIR
    first = json.loads((next(iter(runs.values()))[0] / "metrics.json").read_text())
    summary = {"metric_definitions": "see tumorseg/metrics.py", "notes": notes, "dataset": dataset.info.to_dict()}
    if seed_reported_row(dataset.info):  # only on the Kaggle data
        summary["seed_reported_test"] = seed_reported_row(dataset.info)
    summary["epochs"] = {"trials": settings.epochs, "final": first["config"]["epochs"]}
    summary["retrain_seeds"] = len(next(iter(runs.values())))

    def train_masks():
        return (sample_mask(dataset, s) for s in dataset.splits["train"])

    boxes = labels_are_boxes(train_masks())
    summary["labels_are_boxes"] = boxes
    outputs = {}
    for recipe, params in todo.items():
        summary[recipe], outputs[recipe] = score_recipe(recipe, params, runs[recipe], final, dataset, settings, boxes, log)
    any_test_split = next(iter(outputs.values()))["test"]  # native masks: the same whichever recipe loaded it
    summary["baselines"] = score_baselines(train_masks(), any_test_split)
    shipped, why = choose_shipped({recipe: summary[recipe] for recipe in todo})
    log(f"final: ships {shipped} ({why})")
    ship(final, shipped, summary[shipped], runs[shipped], outputs[shipped], dataset)
    summary["final_model"] = {
        "recipe": shipped, "chosen_by": why,
        "members": [f"{FINAL_MODEL_DIR}/{member_file(k)}" for k in range(len(runs[shipped]))],
        "postprocess": POSTPROCESS_JSON, "test": summary[shipped]["ensemble_postprocessed"]["test"],
        "model_pt": summary[shipped]["best_member_run"],
        "model_pt_is": "the member with the best validation Dice (one file, no post-processing)",
    }
    summary["wall_s"] = {"retrain": retrain_wall_s, "ensemble_and_postprocess": time.perf_counter() - t0}
    write_json(final / "metrics.json", summary)
    return summary


def choose_shipped(entries: dict[str, dict], margin: float = MARGIN) -> tuple[str, str]:
    """The recipe to ship and why, by each recipe's validation Dice with its post-processing (never
    test): ``best`` unless ``seed_recipe`` is higher by more than ``margin``; whichever exists alone."""
    if "best" not in entries:
        return "seed_recipe", "no trial succeeded"
    val = {recipe: entry["ensemble_postprocessed"]["valid"]["dice"] for recipe, entry in entries.items()}
    shipped = "seed_recipe" if val["seed_recipe"] > val["best"] + margin else "best"
    return shipped, (f"validation Dice with post-processing: best {val['best']:.4f}, seed recipe {val['seed_recipe']:.4f}; "
                     f"the sweep's best unless the seed recipe leads by more than {margin}")


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": arr.tolist()}


def score_recipe(recipe: str, params: dict, run_dirs: list[Path], final: Path, dataset, settings, boxes: bool, log) -> tuple[dict, dict]:
    """A recipe's entry of ``final/metrics.json`` and, for shipping, its test predictions."""
    import torch

    from tumorseg.checkpoint import load_model
    from tumorseg.data import load_dataset
    from tumorseg.inference import (
        mean_probabilities,
        mirrored_probabilities,
        with_flip_tta,
    )
    from tumorseg.metrics import mask_counts, thresholded_scores

    per_seed = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    loaded = [load_model(d / "model.pt") for d in run_dirs]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, cfg = [m.to(device) for m, _, _ in loaded], loaded[0][1]
    data = load_dataset(dataset, cfg.resize_px, splits=("valid", "test"), cache_dir=settings.cache_dir)
    valid, test = data["valid"], data["test"]
    raw = PostProcess(threshold=cfg.threshold)

    val_masks = valid.native_mask(slice(None))
    # predict_probabilities without and with flip TTA, the plain half computed once
    val_plain = mean_probabilities(models, valid.images, cfg, valid.native_hw)
    val_flip = with_flip_tta(val_plain, mirrored_probabilities(models, valid.images, cfg, valid.native_hw))
    pp, table = select_postprocess(val_plain, val_flip, val_masks, boxes, MARGIN, base_threshold=cfg.threshold)
    val_raw = thresholded_scores(mask_counts(apply_postprocess(val_plain, raw), val_masks))
    val_pp = thresholded_scores(mask_counts(apply_postprocess(val_flip if pp.flip_tta else val_plain, pp), val_masks))
    del val_plain, val_flip, val_masks

    test_masks = test.native_mask(slice(None))
    test_plain = mean_probabilities(models, test.images, cfg, test.native_hw)
    raw_counts = mask_counts(apply_postprocess(test_plain, raw), test_masks)
    test_probs = test_plain
    if pp.flip_tta:
        test_probs = with_flip_tta(test_plain, mirrored_probabilities(models, test.images, cfg, test.native_hw))
    pp_masks = apply_postprocess(test_probs, pp)
    pp_counts = mask_counts(pp_masks, test_masks)
    del test_plain, test_probs

    rel = [str(d.relative_to(final)) for d in run_dirs]
    best_member = max(range(len(per_seed)), key=lambda k: per_seed[k]["valid"]["dice"])  # by val, never test
    entry = {
        "params": params,
        "key": run_dirs[0].parent.name,
        "runs": rel,
        "seeds": [m["config"]["seed"] for m in per_seed],
        "epochs": cfg.epochs,
        "resize_px": cfg.resize_px,
        "test": {k: _mean_std([m["test"][k] for m in per_seed]) for k in METRICS},  # per seed
        "valid": {k: _mean_std([m["valid"][k] for m in per_seed]) for k in METRICS},
        "train_wall_s": [m.get("train_wall_s") for m in per_seed],
        "ensemble": {"members": len(models), "test": thresholded_scores(raw_counts), "valid": val_raw},
        "postprocess": pp.to_dict(),
        "postprocess_describe": pp.describe(),
        "postprocess_selection": table,
        "ensemble_postprocessed": {"test": thresholded_scores(pp_counts), "valid": val_pp},
        "best_member_run": rel[best_member],
    }
    log(f"final: {recipe}, ensemble of {len(models)}: val dice {val_raw['dice']:.4f} -> {val_pp['dice']:.4f} with "
        f"post-processing chosen on validation ({pp.describe()})")
    outputs = {"test": test, "pp": pp, "table": table, "masks": pp_masks, "counts": pp_counts, "raw_counts": raw_counts,
               "best_member": run_dirs[best_member]}
    return entry, outputs


def score_baselines(train_masks, test) -> dict:
    """The trivial baselines' test metrics (``tumorseg.inspect_data``), on the split the models are scored on."""
    from tumorseg.inspect_data import baseline_counts, train_mean_box
    from tumorseg.metrics import thresholded_scores

    box = train_mean_box(train_masks)
    test_masks = list(test.native_mask(slice(None)))
    out = {name: {"test": thresholded_scores(counts)} for name, counts in baseline_counts(box, test_masks).items()}
    if box is not None:
        out["train_mean_box"]["box"] = list(box)
    return out


# ----------------------------------------------------------------------------- the shipped model


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no second copy of the weights), else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def ship(final: Path, recipe: str, entry: dict, run_dirs: list[Path], outputs: dict, dataset) -> None:
    """``final/model/``, ``final/postprocess.json``, ``final/model.pt`` and the shipped predictions."""
    staging = final / (FINAL_MODEL_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for k, run in enumerate(run_dirs):
        link_or_copy(run / "model.pt", staging / member_file(k))
    shutil.rmtree(final / FINAL_MODEL_DIR, ignore_errors=True)  # members of an earlier key or a larger K go
    staging.rename(final / FINAL_MODEL_DIR)
    save_postprocess(final / POSTPROCESS_JSON, outputs["pp"], outputs["table"], margin=MARGIN, recipe=recipe,
                     key=entry["key"], members=len(run_dirs),
                     val_dice={"without": entry["ensemble"]["valid"]["dice"], "with": entry["ensemble_postprocessed"]["valid"]["dice"]})
    link_or_copy(outputs["best_member"] / "model.pt", final / "model.pt")
    write_shipped_predictions(final, outputs, dataset)


def write_shipped_predictions(final: Path, outputs: dict, dataset) -> None:
    """``test_per_image.csv``, ``overlay_{best,median,worst}.png`` and ``predictions.png`` of the
    shipped model's post-processed test masks, drawn at native resolution."""
    import pandas as pd
    from PIL import Image

    from tumorseg.data import decode_sample
    from tumorseg.metrics import dice_per_image, iou_per_image
    from tumorseg.visualize import caption, grid, overlay, pick_spread

    test, masks, counts = outputs["test"], outputs["masks"], outputs["counts"]
    dice = dice_per_image(counts)
    pd.DataFrame({"file_name": test.file_names, "dice": dice, "iou": iou_per_image(counts),
                  "dice_without_postprocess": dice_per_image(outputs["raw_counts"])}).to_csv(final / "test_per_image.csv", index=False)
    samples = dataset.splits["test"]

    def tile(i: int, text: str, size_px: int) -> Image.Image:
        picture = overlay(decode_sample(dataset, samples[i], None), test.native_mask(i), masks[i])
        picture = picture.resize((size_px, size_px), Image.Resampling.NEAREST)
        caption(picture, text)
        return picture

    order = np.argsort(-dice, kind="stable")
    picks = {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}
    for name, i in picks.items():
        tile(i, f"{name}: dice {dice[i]:.2f} {test.file_names[i]}", 320).save(final / f"overlay_{name}.png")
    grid([tile(i, f"#{i} dice {dice[i]:.2f}", 192) for i in pick_spread(dice, 12)]).save(final / "predictions.png")


# ----------------------------------------------------------------------------- the terminal's table


def format_summary(summary: dict) -> str:
    """The final table as the retrain prints it: per seed, ensemble, + post-processing, baselines."""
    dataset = summary.get("dataset") or {}
    epochs = summary.get("epochs", {})
    seeds = summary.get("retrain_seeds", 1)
    on = f"on {dataset.get('name', '?')} ({dataset.get('layout', '?')}, fingerprint {dataset.get('fingerprint', '?')})"
    title = (f"test metrics {on}; {seeds} seed(s) x {epochs.get('final', '?')} epochs per recipe "
             f"(trials: <= {epochs.get('trials', '?')}):")
    lines = [title,
             f"  {'':38s}" + "".join(f"{k:>18s}" for k in SHOWN)]

    def row(label: str, values: dict, spread: bool = False) -> str:
        cells = [f"{values[k]['mean']:.4f} +- {values[k]['std']:.4f}" if spread else
                 f"{(values[k]['mean'] if isinstance(values[k], dict) else values[k]):.4f}" for k in SHOWN]
        return f"  {label:38s}" + "".join(f"{c:>18s}" for c in cells)

    for recipe in ("best", "seed_recipe"):
        entry = summary.get(recipe)
        if not entry:
            continue
        k = len(entry["seeds"])
        lines.append(row(f"{recipe}, {'per seed (mean +- std)' if k > 1 else 'one seed'}", entry["test"], spread=k > 1))
        if "ensemble" in entry:
            if k > 1:
                lines.append(row(f"{recipe}, ensemble of {k}", entry["ensemble"]["test"]))
            lines.append(row(f"{recipe}, {'ensemble ' if k > 1 else ''}+ post-processing", entry["ensemble_postprocessed"]["test"]))
    names = {"all_background": "baseline: all background", "train_mean_box": "baseline: training mean box"}
    for name, base in summary.get("baselines", {}).items():
        lines.append(row(names.get(name, name), base["test"]))
    s = summary.get("seed_reported_test")
    if s:
        lines.append(f"  {'seed report':38s}f1 {s['f1']}  precision {s['precision']}  recall {s['recall']}  "
                     "(measured on Kaggle's own test split at 256 px)")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    shipped = summary.get("final_model")
    if shipped:
        lines.append(f"shipped: {shipped['recipe']}, {len(shipped['members'])} member(s) in {FINAL_DIR}/{FINAL_MODEL_DIR}/ + "
                     f"{FINAL_DIR}/{POSTPROCESS_JSON}: test dice {shipped['test']['dice']:.4f}")
    return "\n".join(lines)
