"""Describe a dataset before training on it: ``python -m tumorseg.data DIR [--json]``.

``tumorseg.data.inspect`` gathers the masks and arrays and calls ``summarize`` here; this module
only computes and formats (it never imports ``tumorseg.data``, which runs the command).

Reports the detected layout; per split the image and case counts; channels, native sizes and bit
depths; the share of empty masks; tumour-area quantiles (share of the image, non-empty masks);
whether the labels are boxes (at least ``BOX_SHARE`` of the connected components are filled
axis-aligned rectangles: overlapping boxes merge into non-rectangles) or outlines; images
identical across splits (compared as cached arrays at ``--size``); and the test Dice of two
trivial baselines (all background; the training masks' mean bounding box, in image-relative
coordinates, predicted on every image), so nobody mistakes a trivial score for a result.

The first three lines of the text report are the ones a sweep prints at start (``summary_lines``).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from tumorseg.coco import rasterize
from tumorseg.metrics import dice_per_image
from tumorseg.postprocess import BOX_SHARE, component_stats
from tumorseg.splits import SPLITS, case_of

AREA_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` of the foreground as fractions of the width/height, or None if empty."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    h, w = mask.shape
    return cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h


def box_counts(box, mask: np.ndarray) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of predicting ``box`` (relative coordinates) on ``mask``."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    pred = rasterize([(x1 * w, y0 * h, x0 * w, y0 * h, x0 * w, y1 * h, x1 * w, y1 * h)], (h, w), (h, w)).astype(bool)
    truth = mask.astype(bool)
    return int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())


def train_mean_box(train_masks) -> tuple[float, float, float, float] | None:
    """The mean bounding box (relative coordinates) of the non-empty training masks, or None."""
    boxes = [b for m in train_masks if (b := bounding_box(m)) is not None]
    return tuple(float(v) for v in np.mean(boxes, 0)) if boxes else None


def baseline_counts(mean_box, test_masks: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image ``(TP, FP, FN)`` on ``test_masks`` of the trivial baselines: all background, and
    (when ``mean_box`` is not None) the training masks' mean box predicted on every image."""
    counts = {"all_background": np.array([(0, 0, int(m.sum())) for m in test_masks], np.int64).reshape(-1, 3)}
    if mean_box is not None:
        counts["train_mean_box"] = np.array([box_counts(mean_box, m) for m in test_masks], np.int64).reshape(-1, 3)
    return counts


def summarize(dataset, masks: dict[str, list[np.ndarray]], duplicates: dict, size_px: int) -> dict:
    """Everything ``python -m tumorseg.data`` reports, as a JSON-able dict.

    ``dataset``: a ``tumorseg.data.Dataset``; ``masks``: its native {0,1} masks per split;
    ``duplicates``: ``tumorseg.data.cross_split_duplicates`` of its arrays at ``size_px``.
    """
    pattern = re.compile(dataset.options.group_by) if dataset.options.group_by else None
    samples = [s for split in SPLITS for s in dataset.splits[split]]
    areas = [float(m.mean()) for split in SPLITS for m in masks[split] if m.any()]
    components = np.array([component_stats(m) for split in SPLITS for m in masks[split]]).reshape(-1, 2).sum(0)
    mean_box = train_mean_box(masks["train"])
    baselines = {name: float(dice_per_image(c).mean()) for name, c in baseline_counts(mean_box, masks["test"]).items()}
    return {
        "dataset": dataset.info.to_dict(),
        "skipped_unlabelled": dataset.skipped_unlabelled,
        "splits": {
            split: {
                "images": len(dataset.splits[split]),
                "cases": len({case_of(s, pattern) for s in dataset.splits[split]}),
                "empty_mask_share": float(np.mean([not m.any() for m in masks[split]])) if masks[split] else 0.0,
            }
            for split in SPLITS
        },
        "channels": dataset.channels,
        "channel_names": list(dataset.channel_names or []),
        "sizes": {f"{w}x{h}": n for (h, w), n in Counter(s.hw for s in samples).most_common()},
        "bit_depths": {str(b): n for b, n in sorted(Counter(s.bit_depth for s in samples).items())},
        "empty_mask_share": float(np.mean([not m.any() for split in SPLITS for m in masks[split]])),
        "tumour_area_quantiles": {f"q{round(q * 100):02d}": float(np.quantile(areas, q)) for q in AREA_QUANTILES} if areas else {},
        "components": int(components[0]),
        "rectangle_components": int(components[1]),
        "labels_are": "boxes" if components[0] and components[1] >= BOX_SHARE * components[0] else "outlines",
        "train_mean_box": mean_box,
        "duplicates": {split: {"count": len(pairs), "examples": pairs[:3]} for split, pairs in duplicates.items()},
        "baselines_test_dice": baselines,
        "duplicates_compared_at_px": size_px,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report_lines(report: dict) -> list[str]:
    """The text report; its first three lines are ``summary_lines``."""
    info, splits = report["dataset"], report["splits"]
    base = report["baselines_test_dice"]
    box = f", training mean box {base['train_mean_box']:.3f}" if "train_mean_box" in base else ""
    origin = {"data": "given by the data", "carved": "carved by case", "file": "read from a splits.json"}[info["splits_from"]]
    lines = [
        f"dataset: {info['name']} ({info['layout']}, fingerprint {info['fingerprint']}) at {info['path']}",
        "splits: " + ", ".join(f"{s} {splits[s]['images']} images / {splits[s]['cases']} cases" for s in SPLITS) + f" ({origin})",
        f"trivial baselines, test Dice: all background {base['all_background']:.3f}{box} (a result must beat these)",
    ]
    names = f" ({', '.join(report['channel_names'])})" if report["channel_names"] else ""
    lines.append(
        f"images: {report['channels']} channel(s){names}; sizes "
        + ", ".join(f"{k} ({n})" for k, n in report["sizes"].items())
        + "; bit depth " + ", ".join(f"{k}-bit ({n})" for k, n in report["bit_depths"].items())
    )
    if report["skipped_unlabelled"]:
        lines.append(f"skipped: {report['skipped_unlabelled']} image(s) without a mask (--allow-unlabelled)")
    lines.append(
        f"masks: empty {_pct(report['empty_mask_share'])} ("
        + ", ".join(f"{s} {_pct(splits[s]['empty_mask_share'])}" for s in SPLITS) + ")"
    )
    if report["tumour_area_quantiles"]:
        lines.append("tumour area, share of the image (non-empty masks): "
                     + ", ".join(f"{k} {_pct(v)}" for k, v in report["tumour_area_quantiles"].items()))
    lines.append(
        f"labels: {report['labels_are']} ({report['rectangle_components']} of {report['components']} components "
        f"are filled axis-aligned rectangles)"
    )
    dup = report["duplicates"]
    if any(d["count"] for d in dup.values()):
        parts = [f"{s} {d['count']} (e.g. {d['examples'][0][0]} = {d['examples'][0][1]})" for s, d in dup.items() if d["count"]]
        lines.append("identical images across splits: " + "; ".join(parts))
    else:
        lines.append("identical images across splits: none")
    return lines


def summary_lines(report: dict) -> list[str]:
    """The three lines a sweep prints at start: dataset, splits, trivial baselines."""
    return report_lines(report)[:3]
