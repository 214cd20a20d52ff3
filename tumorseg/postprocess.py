"""Post-processing of probability maps, chosen on validation only (nnU-Net style), and the shipped model.

The pipeline (``apply_postprocess``), on probabilities ``(N, H, W)`` at each image's native size:

1. **threshold**: a pixel is tumour when its probability is above ``threshold`` (strict, as
   ``tumorseg.inference.mask_from_logits``);
2. **min_component_px**: 8-connected components with fewer pixels are removed;
3. **keep_largest**: only the largest remaining component is kept (ties: the first in raster order);
4. **fill_boxes**: each remaining component is filled to its axis-aligned bounding box.

**flip_tta** acts before all of these, where the probabilities are computed: the mean of the model
on the image and on its horizontal flip, flipped back (``tumorseg.inference.predict_probabilities``).

``select_postprocess`` chooses the pipeline greedily on the validation split, in the order above
(threshold from ``THRESHOLDS``, then flip TTA, then N from ``MIN_COMPONENT_FRACTIONS`` of the image
area, then keep-largest, then box filling only where the training labels are boxes). A step is kept
only if it raises validation Dice (``tumorseg.metrics``: per image, averaged) by more than
``margin`` (``MARGIN`` = 0.002): one image of a 429-image validation split going from a miss to a
hit moves the mean by 1/429 = 0.0023, so a smaller gain is within what one image's luck gives and
is not kept. The test split is never looked at; it is scored once, with and without the pipeline.

The shipped model of a ``search.run`` folder (the contract ``load_final_model`` reads):

    final/model/member<k>.pt   one tumorseg model.pt per retrain seed of the shipped recipe (an ensemble
                               when there are several: mean of the members' probabilities)
    final/postprocess.json     {"format": "tumorseg-postprocess", "postprocess": PostProcess.to_dict(),
                                "selection": [one row per candidate tried], ...}
    final/metrics.json         test metrics: per seed, ensemble, with and without post-processing, baselines

This module needs numpy and scipy only; ``select_postprocess`` and ``load_final_model`` import
torch-based modules when called.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.errors import UserError

FINAL_DIR = "final"  # in a search.run folder
FINAL_MODEL_DIR = "model"  # inside FINAL_DIR: member<k>.pt
POSTPROCESS_JSON = "postprocess.json"  # inside FINAL_DIR
POSTPROCESS_FORMAT = "tumorseg-postprocess"

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_COMPONENT_FRACTIONS = (0.0005, 0.001, 0.002, 0.005, 0.01)  # of the image area (640 x 640: 205 to 4096 px)
MARGIN = 0.002  # see the module docstring
BOX_SHARE = 0.9  # labels are boxes when at least this share of training components are filled rectangles
EIGHT_CONNECTED = np.ones((3, 3), bool)


def member_file(k: int) -> str:
    return f"member{k}.pt"


@dataclass(frozen=True)
class PostProcess:
    threshold: float = 0.5
    flip_tta: bool = False
    min_component_px: int = 0
    keep_largest: bool = False
    fill_boxes: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PostProcess:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown post-processing field(s): {', '.join(unknown)}")
        pp = cls(**values)
        if not 0 < pp.threshold < 1 or pp.min_component_px < 0:
            raise ValueError(f"invalid post-processing {values}")
        return pp

    def describe(self) -> str:
        steps = [f"threshold {self.threshold:g}"]
        steps += ["flip TTA"] if self.flip_tta else []
        steps += [f"remove components < {self.min_component_px} px"] if self.min_component_px else []
        steps += ["keep the largest component"] if self.keep_largest else []
        steps += ["fill components to their boxes"] if self.fill_boxes else []
        return ", ".join(steps)


# ----------------------------------------------------------------------------- components


def component_stats(mask: np.ndarray) -> tuple[int, int]:
    """``(components, filled axis-aligned rectangles among them)`` of a {0,1} mask (8-connected)."""
    from scipy import ndimage

    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    boxes = 0
    for i, where in enumerate(ndimage.find_objects(labelled), start=1):
        boxes += bool((labelled[where] == i).all())
    return count, boxes


def labels_are_boxes(train_masks: Iterable[np.ndarray], share: float = BOX_SHARE) -> bool:
    """Whether the training labels are boxes: at least ``share`` of all components of the masks are
    filled axis-aligned rectangles (the rule of ``python -m tumorseg.data``'s "labels:" line; not
    every one, because overlapping boxes merge into non-rectangles; the dev data: 1285 of 1286)."""
    counts = np.array([component_stats(m) for m in train_masks]).reshape(-1, 2).sum(0)
    return bool(counts[0] and counts[1] >= share * counts[0])


def postprocess_mask(mask: np.ndarray, pp: PostProcess) -> np.ndarray:
    """Steps 2-4 of the pipeline on one boolean ``(H, W)`` mask."""
    if not (pp.min_component_px or pp.keep_largest or pp.fill_boxes):
        return mask
    from scipy import ndimage

    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return mask
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    keep = sizes >= pp.min_component_px
    if pp.keep_largest and keep.any():
        largest = int(np.argmax(np.where(keep, sizes, -1)))  # the first of equals: raster order
        keep = np.arange(count) == largest
    if not pp.fill_boxes:
        return np.concatenate([[False], keep])[labelled]
    out = np.zeros_like(mask, dtype=bool)
    for i, where in enumerate(ndimage.find_objects(labelled)):
        if keep[i]:
            out[where] = True
    return out


def apply_postprocess(probabilities: np.ndarray, pp: PostProcess) -> np.ndarray:
    """uint8 {0, 1} masks ``(N, H, W)`` from probabilities ``(N, H, W)`` at native size (flip TTA,
    if chosen, is already in the probabilities)."""
    masks = np.asarray(probabilities) > pp.threshold
    return np.stack([postprocess_mask(m, pp) for m in masks]).astype(np.uint8) if len(masks) else masks.astype(np.uint8)


# ----------------------------------------------------------------------------- selection on validation


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """The project's Dice (``tumorseg.metrics``: per image, empty/empty = 1, averaged over images)."""
    from tumorseg.metrics import dice_per_image, mask_counts

    return float(dice_per_image(mask_counts(pred, truth)).mean())


def min_component_grid(hw: tuple[int, int]) -> list[int]:
    """Candidate N in pixels: ``MIN_COMPONENT_FRACTIONS`` of the image area (at least 1, distinct)."""
    area = hw[0] * hw[1]
    return sorted({max(1, round(f * area)) for f in MIN_COMPONENT_FRACTIONS})


def select_postprocess(
    val_probs: np.ndarray,
    val_probs_flip_tta: np.ndarray | None,
    val_masks: np.ndarray,
    labels_are_boxes: bool,
    margin: float = MARGIN,
    *,
    base_threshold: float = 0.5,
) -> tuple[PostProcess, list[dict]]:
    """Choose the pipeline on validation (greedy, see the module docstring).

    ``val_probs`` / ``val_probs_flip_tta``: float ``(N, H, W)`` probabilities at native size without
    and with flip TTA (None: flip TTA is not tried); ``val_masks``: the true {0, 1} masks.
    ``base_threshold``: the configuration's threshold, the starting point.
    Returns the pipeline and the table of every candidate: ``{"step", "value", "val_dice", "kept"}``.
    """
    probs = {False: val_probs, True: val_probs_flip_tta}
    pp = PostProcess(threshold=base_threshold)

    def score(candidate: PostProcess) -> float:
        return mean_dice(apply_postprocess(probs[candidate.flip_tta], candidate), val_masks)

    best = score(pp)
    table = [{"step": "none", "value": None, "val_dice": best, "kept": True}]

    def consider(step: str, candidates: list[PostProcess]) -> None:
        nonlocal pp, best
        rows = [{"step": step, "value": getattr(c, step), "val_dice": score(c), "kept": False} for c in candidates]
        table.extend(rows)
        top = max(range(len(rows)), key=lambda i: (rows[i]["val_dice"], -i))  # ties: the first in the grid
        if rows[top]["val_dice"] > best + margin:
            pp, best = candidates[top], rows[top]["val_dice"]
            rows[top]["kept"] = True

    consider("threshold", [dataclasses.replace(pp, threshold=t) for t in THRESHOLDS if t != pp.threshold])
    if val_probs_flip_tta is not None:
        consider("flip_tta", [dataclasses.replace(pp, flip_tta=True)])
    consider("min_component_px", [dataclasses.replace(pp, min_component_px=n) for n in min_component_grid(val_masks.shape[1:])])
    consider("keep_largest", [dataclasses.replace(pp, keep_largest=True)])
    if labels_are_boxes:
        consider("fill_boxes", [dataclasses.replace(pp, fill_boxes=True)])
    return pp, table


# ----------------------------------------------------------------------------- files


def save_postprocess(path: Path, pp: PostProcess, selection_table: list[dict], **extra) -> None:
    """``final/postprocess.json``: the pipeline, how it was chosen, and ``extra`` (margin, Dice...)."""
    payload = {"format": POSTPROCESS_FORMAT, "version": 1, "postprocess": pp.to_dict(), "describe": pp.describe(),
               "chosen_on": "validation", "selection": selection_table, **extra}
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def load_postprocess(path: Path) -> PostProcess:
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"post-processing file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != POSTPROCESS_FORMAT:
        raise UserError(f"{path}: not a tumorseg post-processing file (no '{POSTPROCESS_FORMAT}' marker)")
    try:
        return PostProcess.from_dict(payload["postprocess"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: invalid post-processing ({err})") from None


def member_files(final_dir: Path) -> list[Path]:
    """``final/model/member<k>.pt`` in member order."""
    found = [(int(m.group(1)), p) for p in (Path(final_dir) / FINAL_MODEL_DIR).glob("member*.pt")
             if (m := re.fullmatch(r"member(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def load_final_model(run_dir: Path):
    """``(models, cfg, PostProcess)`` of the shipped model of a ``search.run`` folder (or of its
    ``final/`` folder): every ``final/model/member<k>.pt`` (evaluation mode, on the CPU) and
    ``final/postprocess.json``. ``cfg`` is member 0's (members differ only in their seed)."""
    from tumorseg.checkpoint import load_model

    run_dir = Path(run_dir)
    final = run_dir if (run_dir / FINAL_MODEL_DIR).is_dir() else run_dir / FINAL_DIR
    files = member_files(final)
    if not files:
        raise UserError(f"{final / FINAL_MODEL_DIR}: no member<k>.pt (is {run_dir} a search.run folder whose retrain finished?)")
    loaded = [load_model(p) for p in files]
    cfg = loaded[0][1]
    for path, (_, other, _) in zip(files, loaded):
        if (other.arch, other.encoder, other.resize_px) != (cfg.arch, cfg.encoder, cfg.resize_px):
            raise UserError(f"{path}: {other.arch}-{other.encoder} at {other.resize_px} px, but {files[0].name} is "
                            f"{cfg.arch}-{cfg.encoder} at {cfg.resize_px} px: not one ensemble")
    return [model for model, _, _ in loaded], cfg, load_postprocess(final / POSTPROCESS_JSON)
