"""The report's view of the final stage (``final/metrics.json``, written by ``search.finalize``).

The headline table: per recipe, the retrain runs per seed (mean +- std), their ensemble, and the
ensemble with the post-processing chosen on validation (the shipped model is marked), then the
seed run's reported numbers (Kaggle data only) and the trivial baselines, all on one test split.
Below it, the post-processing each recipe got and every candidate the selection tried.
"""

from __future__ import annotations

import html

REPORT_METRICS = ("dice", "iou", "f1", "precision", "recall", "dice_loss")
RECIPES = (("best", "best configuration"), ("seed_recipe", "seed recipe"))
BASELINES = {"all_background": "trivial baseline: all background",
             "train_mean_box": "trivial baseline: the training masks' mean box on every image"}


def mean_std_html(entry: dict | None, seeds: int) -> str:
    """Mean and spread over seeds; one seed has no spread to show."""
    if not entry:
        return "-"
    return f"{entry['mean']:.4f} &plusmn; {entry['std']:.4f}" if seeds > 1 else f"{entry['mean']:.4f}"


def _value_html(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _row(label: str, cells: list[str], strong: bool = False) -> str:
    label = f"<b>{label}</b>" if strong else label
    return f"<tr><th>{label}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def recipe_rows(final: dict) -> list[str]:
    """Per recipe: per seed, ensemble (K > 1), ensemble + post-processing (marked when shipped)."""
    rows = []
    shipped = (final.get("final_model") or {}).get("recipe")
    for recipe, name in RECIPES:
        entry = final.get(recipe)
        if not entry:
            continue
        seeds = len(entry["seeds"])
        budget = f"{entry['resize_px']} px, {entry['epochs']} epochs"
        per_seed = f"{name}, retrained ({seeds} seed{'s' if seeds > 1 else ''}, {budget})"
        rows.append(_row(html.escape(per_seed), [mean_std_html(entry["test"].get(m), seeds) for m in REPORT_METRICS]))
        if "ensemble" not in entry:  # a metrics.json from before ensembles
            continue
        if seeds > 1:
            cells = [_value_html(entry["ensemble"]["test"].get(m)) for m in REPORT_METRICS]
            rows.append(_row(html.escape(f"{name}, ensemble of {seeds} (mean of probabilities)"), cells))
        what = f"{name}, {'ensemble ' if seeds > 1 else ''}+ post-processing ({entry['postprocess_describe']})"
        if recipe == shipped:
            what += ": the shipped model"
        cells = [_value_html(entry["ensemble_postprocessed"]["test"].get(m)) for m in REPORT_METRICS]
        rows.append(_row(html.escape(what), cells, strong=recipe == shipped))
    return rows


def reference_rows(final: dict) -> list[str]:
    """The seed run's reported numbers (Kaggle data only) and the trivial baselines."""
    rows = []
    s = final.get("seed_reported_test")
    if s:
        rows.append(_row("seed run as originally reported (measured on Kaggle's own test split at 256 px)",
                         ["-", "-", str(s["f1"]), str(s["precision"]), str(s["recall"]), str(s["dice_loss"])]))
    for name, label in BASELINES.items():
        base = (final.get("baselines") or {}).get(name)
        if base:
            rows.append(_row(html.escape(label), [_value_html(base["test"].get(m)) for m in REPORT_METRICS]))
    return rows


def final_table_html(final: dict) -> str:
    epochs = final.get("epochs")
    budget = (f" Trials ran at most {epochs['trials']} epochs; each final run {epochs['final']} epochs (<code>--final-epochs</code>)."
              if epochs else "")
    return ("<p>Test metrics, each model scored once on the test split after every choice was made on validation "
            f"(dice_loss is per run, at the training resolution).{budget}</p>"
            "<table class='grid'><tr><th></th>" + "".join(f"<th>{m}</th>" for m in REPORT_METRICS) + "</tr>"
            + "".join(recipe_rows(final) + reference_rows(final)) + "</table>")


def postprocess_html(final: dict) -> str:
    """How each recipe's post-processing was chosen: every candidate and its validation Dice."""
    parts = []
    for recipe, name in RECIPES:
        entry = final.get(recipe)
        if not entry or "postprocess_selection" not in entry:
            continue
        rows = "".join(
            f"<tr><td>{html.escape(row['step'])}</td><td>{html.escape(str(row['value']))}</td>"
            f"<td>{row['val_dice']:.4f}</td><td>{'kept' if row['kept'] else ''}</td></tr>"
            for row in entry["postprocess_selection"])
        parts.append(f"<details><summary>Post-processing of the {name}: {html.escape(entry['postprocess_describe'])} "
                     f"(validation Dice {entry['ensemble']['valid']['dice']:.4f} &rarr; "
                     f"{entry['ensemble_postprocessed']['valid']['dice']:.4f})</summary>"
                     "<table class='grid'><tr><th>step</th><th>candidate</th><th>val Dice</th><th></th></tr>"
                     f"{rows}</table></details>")
    if parts:
        boxes = "the training labels are boxes, so box filling was tried" if final.get("labels_are_boxes") else \
            "the training labels are not boxes, so box filling was not tried"
        parts.insert(0, "<p>Post-processing was chosen greedily on the validation split only (threshold, flip TTA, "
                        "small components, largest component, box filling; a step is kept only if it raises validation "
                        f"Dice by more than a margin, see <code>tumorseg/postprocess.py</code>); {boxes}.</p>")
    return "\n".join(parts)
