"""The one typed configuration of a training run.

``TrainConfig`` flows unchanged from the CLI (``tumorseg.train``) to the search's trainable, the
retrain stage and the report. Every default is the seed recipe: the hand-tuned single run this
project set out to beat (test F1 0.199, precision 0.139, recall 0.348, Dice loss 0.7768).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tumorseg.errors import ConfigError

LOSS_TYPES = ("dice", "dice_bce", "dice_focal")
PRECISIONS = ("auto", "bf16", "fp32")

# What the seed run reported on the (Kaggle) test split; shown beside our numbers, never recomputed.
SEED_REPORTED_TEST_METRICS = {"f1": 0.199, "precision": 0.139, "recall": 0.348, "dice_loss": 0.7768}


def _field(default, help: str, **metadata: Any):
    """A dataclass field with its CLI metadata (``tumorseg.cli.add_dataclass_arguments`` reads it)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    # --- input ---
    resize_px: int = _field(256, "training size in px (square; a multiple of the encoder's output stride, 32 for most)", flag="--resize")
    # --- loss: which terms and their weights (only the weights of the chosen loss_type matter) ---
    loss_type: str = _field("dice_bce", "loss terms", flag="--loss", choices=LOSS_TYPES)
    dice_weight: float = _field(0.75, "weight of the Dice term")
    bce_weight: float = _field(1.25, "weight of the BCE term (loss dice_bce)")
    focal_weight: float = _field(1.0, "weight of the focal term (loss dice_focal)")
    focal_gamma: float = _field(2.0, "focal loss gamma (loss dice_focal)")
    # --- optimiser and schedule: AdamW, linear warmup, then ReduceLROnPlateau on val loss ---
    lr: float = _field(1e-4, "AdamW peak learning rate")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    # the seed run's warmup length was not recorded; 2 of 20 epochs (10 %)
    warmup_epochs: int = _field(2, "epochs of linear learning-rate warmup (per step)")
    plateau_factor: float = _field(0.5, "ReduceLROnPlateau factor on val loss, in (0, 1)")
    plateau_patience: int = _field(3, "ReduceLROnPlateau patience in epochs")
    batch_size: int = _field(16, "training batch size (global, over all processes)")
    epochs: int = _field(20, "training epochs")
    # --- augmentation (train only): flips, small rotation/translation, brightness/contrast jitter ---
    # aug_strength scales the last three (rotation, translation, jitter); 0 leaves flips only
    aug_strength: float = _field(1.0, "scales rotation, translation and jitter; 0 = flips only")
    rotate_deg: float = _field(15.0, "largest random rotation in degrees")
    translate_frac: float = _field(0.05, "largest random shift as a fraction of the image size")
    jitter_strength: float = _field(0.2, "brightness/contrast jitter strength")
    # --- model: smp.create_model(arch, encoder_name=encoder); names checked by tumorseg.model.check_model ---
    arch: str = _field("Unet", "smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, Segformer, ...")
    encoder: str = _field("resnet18", "smp encoder name: resnet18, resnet34, efficientnet-b0, mobilenet_v2, ...")
    encoder_weights: str = _field(
        "imagenet", "encoder weights: imagenet (or another name smp lists for the encoder) | none | "
        "a weights file | a folder of <encoder>.safetensors/.pth files")
    # --- execution ---
    seed: int = _field(0, "random seed (weights, shuffling, augmentation)")
    precision: str = _field("auto", "auto: bf16 autocast where the device supports it, else fp32", choices=PRECISIONS)
    channels_last: bool = _field(True, "channels-last memory format")
    compile: bool = _field(False, "torch.compile the model")
    num_workers: int = _field(2, "DataLoader worker processes for the train split")
    eval_batch_size: int = _field(32, "batch size of evaluation and prediction")
    threshold: float = _field(0.5, "probability above which a pixel is tumour, in (0, 1)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid field."""
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        positive = {
            "resize_px": self.resize_px,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        non_negative = {
            "dice_weight": self.dice_weight,
            "bce_weight": self.bce_weight,
            "focal_weight": self.focal_weight,
            "focal_gamma": self.focal_gamma,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "plateau_patience": self.plateau_patience,
            "rotate_deg": self.rotate_deg,
            "translate_frac": self.translate_frac,
            "jitter_strength": self.jitter_strength,
            "aug_strength": self.aug_strength,
            "num_workers": self.num_workers,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        # resize_px against the encoder's output stride, and the names: tumorseg.model.check_model
        # (it needs smp's registries, too heavy for every config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict; an unknown key is an error (it is almost always a typo)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


SEED_RECIPE = TrainConfig()
