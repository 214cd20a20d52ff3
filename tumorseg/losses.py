"""Training losses, composed from segmentation-models-pytorch's losses.

- ``dice``:       smp ``DiceLoss`` (binary, from logits)
- ``dice_bce``:   ``dice_weight * Dice + bce_weight * BCE``   (the seed recipe: 0.75 / 1.25)
- ``dice_focal``: ``dice_weight * Dice + focal_weight * Focal(gamma=focal_gamma)``

smp's binary Dice pools all pixels of the batch (one soft Dice per batch, not per image).
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, SoftBCEWithLogitsLoss
from torch import nn

from tumorseg.config import TrainConfig


class WeightedSum(nn.Module):
    """``sum(weight * loss(logits, target))`` over named terms."""

    def __init__(self, **terms: tuple[float, nn.Module]):
        super().__init__()
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: loss for name, (_, loss) in terms.items()})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        return sum(self.weights[name] * loss(logits, target) for name, loss in self.terms.items())


def create_loss(cfg: TrainConfig) -> nn.Module:
    dice = DiceLoss(mode="binary", from_logits=True)
    if cfg.loss_type == "dice":
        return WeightedSum(dice=(1.0, dice))
    if cfg.loss_type == "dice_bce":
        return WeightedSum(dice=(cfg.dice_weight, dice), bce=(cfg.bce_weight, SoftBCEWithLogitsLoss()))
    if cfg.loss_type == "dice_focal":
        focal = FocalLoss(mode="binary", gamma=cfg.focal_gamma)
        return WeightedSum(dice=(cfg.dice_weight, dice), focal=(cfg.focal_weight, focal))
    raise ValueError(f"unknown loss_type {cfg.loss_type!r}")  # TrainConfig.validate() prevents this
