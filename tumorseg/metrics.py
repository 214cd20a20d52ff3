"""Segmentation metrics at native resolution, as composable pieces.

Definitions (``P`` = predicted tumour pixels, probability > threshold; ``T`` = true tumour pixels;
per image ``TP = |P & T|``, ``FP = |P & ~T|``, ``FN = |~P & T|``):

- ``dice``: per-image Dice ``2 TP / (2 TP + FP + FN)``, averaged over images. An image with an
  empty mask and an empty prediction scores 1 (nothing to find, nothing found); an empty mask with
  any prediction scores 0.
- ``iou``: per-image IoU ``TP / (TP + FP + FN)``, averaged likewise (empty/empty = 1).
- ``precision``, ``recall``, ``f1``: pixel counts pooled over the whole split first, then
  ``ΣTP / (ΣTP + ΣFP)``, ``ΣTP / (ΣTP + ΣFN)`` and ``2 ΣTP / (2 ΣTP + ΣFP + ΣFN)`` (0 where a
  denominator is 0). Pooled F1 equals the harmonic mean of pooled precision and recall.
  **These are the seed run's reported numbers** (F1 0.199 = 2 * 0.139 * 0.348 / (0.139 + 0.348)).
- ``dice_loss``: the soft Dice loss pooled over the split, ``1 - 2 Σ p t / (Σ p + Σ t)`` with
  probabilities ``p``: the split-level analogue of the seed's "Dice loss 0.7768" (smp's DiceLoss
  pools a batch the same way). Like the seed's, it is measured at the training resolution.

The thresholded metrics are computed at each image's native resolution (logits upsampled
bilinearly to it, masks rasterised there from the polygons), so runs trained at different sizes
are compared on the same pixels. ``p > threshold`` is ``tumorseg.inference.mask_from_logits``,
the one threshold test of predictions, overlays and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tumorseg.inference import mask_from_logits


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image ``(TP, FP, FN)`` as an int64 ``(B, 3)`` tensor from boolean ``(B, ...)`` masks."""
    # Sums of 0/1 floats (exact below 2**24 pixels per image, float64 beyond) with FP = |P| - TP and
    # FN = |T| - TP: ~2x faster than three boolean masks on 640 x 640 native masks.
    dtype = torch.float32 if pred[0].numel() < 2**24 else torch.float64
    pred, target = pred.flatten(1).to(dtype), target.flatten(1).to(dtype)
    tp, predicted, true = (pred * target).sum(1), pred.sum(1), target.sum(1)
    return torch.stack([tp, predicted - tp, true - tp], 1).long()


def mask_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image ``(TP, FP, FN)`` as int64 ``(N, 3)`` from {0, 1} numpy masks ``(N, H, W)``."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    axes = tuple(range(1, pred.ndim))
    tp = np.count_nonzero(pred & truth, axis=axes)
    return np.stack([tp, np.count_nonzero(pred, axis=axes) - tp, np.count_nonzero(truth, axis=axes) - tp], 1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def dice_per_image(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = np.asarray(counts).T
    return _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)


def iou_per_image(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = np.asarray(counts).T
    return _ratio(tp, tp + fp + fn, empty=1.0)


def pooled_scores(counts: np.ndarray) -> dict[str, float]:
    tp, fp, fn = np.asarray(counts).sum(0)
    return {
        "precision": float(_ratio(tp, tp + fp, 0.0)),
        "recall": float(_ratio(tp, tp + fn, 0.0)),
        "f1": float(_ratio(2 * tp, 2 * tp + fp + fn, 0.0)),
    }


def thresholded_scores(counts: np.ndarray) -> dict[str, float]:
    """Every thresholded metric of a split from its per-image counts: ``dice``, ``iou`` (per image,
    averaged) and the pooled ``precision``, ``recall``, ``f1``."""
    counts = np.asarray(counts).reshape(-1, 3)
    return {
        "dice": float(dice_per_image(counts).mean()) if len(counts) else float("nan"),
        "iou": float(iou_per_image(counts).mean()) if len(counts) else float("nan"),
        **pooled_scores(counts),
    }


@dataclass
class SegmentationMeter:
    """Accumulates native-resolution counts over a split; ``compute()`` gives every metric."""

    threshold: float = 0.5
    counts: list = field(default_factory=list)  # (B, 3) int64 arrays
    soft: np.ndarray = field(default_factory=lambda: np.zeros(3))  # Σ p t, Σ p, Σ t

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Counts from ``logits`` and ``target`` ``(B, 1, H, W)`` at the native resolution."""
        pred = mask_from_logits(logits, self.threshold)
        self.counts.append(confusion_counts(pred, target.to(logits.device)).cpu().numpy())

    def update_soft(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Soft Dice sums from ``logits`` and ``target`` at the training resolution."""
        probs, t = torch.sigmoid(logits.float()), target.to(logits.device).float()
        self.soft += np.array([(probs * t).sum().item(), probs.sum().item(), t.sum().item()])

    @property
    def per_image_counts(self) -> np.ndarray:
        return np.concatenate(self.counts) if self.counts else np.zeros((0, 3), np.int64)

    def compute(self) -> dict[str, float]:
        inter, p_sum, t_sum = self.soft
        return {
            **thresholded_scores(self.per_image_counts),
            "dice_loss": float(1.0 - _ratio(2 * inter, p_sum + t_sum, 1.0)),
        }
