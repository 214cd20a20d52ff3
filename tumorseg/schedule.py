"""The learning-rate schedule: linear warmup per step, then ReduceLROnPlateau on val loss per epoch."""

from __future__ import annotations

import torch

from tumorseg.config import TrainConfig


class WarmupThenPlateau:
    """Linear warmup per step over ``warmup_epochs``, then ReduceLROnPlateau on val loss per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.warmup_steps = cfg.warmup_epochs * steps_per_epoch
        self.steps = 0
        self.warmup = None
        if self.warmup_steps:
            total = self.warmup_steps
            self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / total))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )

    def step_batch(self) -> None:
        self.steps += 1
        if self.warmup is not None and self.steps < self.warmup_steps:
            self.warmup.step()

    def step_epoch(self, val_loss: float) -> None:
        if self.steps >= self.warmup_steps:
            self.plateau.step(val_loss)

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "warmup": self.warmup.state_dict() if self.warmup else None,
            "plateau": self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])
