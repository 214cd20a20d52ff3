"""Augmentation pipelines (albumentations) and input normalisation.

Pipelines work on uint8 arrays, ``(S, S)`` for one channel or ``(C, S, S)`` for more (given to
albumentations as ``H x W x C``: geometry moves every channel alike, brightness/contrast jitter
applies to each), and return uint8: normalisation happens on the device (``normalize``), so
workers and host-to-device copies move 4x fewer bytes than float32.

- train: ``train_transform(cfg)`` then ``normalize``;
- eval: the cached arrays as they are (resized once, at cache time) then ``normalize``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from tumorseg.config import TrainConfig

# ImageNet statistics, grey equivalent: a 1-channel ResNet initialised from ImageNet sums the
# RGB filters of conv1 (smp's patch_first_conv), which is exact for a grey image replicated to
# RGB when the per-channel statistics are replaced by their means.
IMAGENET_GRAY_MEAN = float(np.mean([0.485, 0.456, 0.406]))  # 0.449
IMAGENET_GRAY_STD = float(np.mean([0.229, 0.224, 0.225]))  # 0.226


def train_transform(cfg: TrainConfig, seed: int | None = None):
    """Flips, small rotation and translation, brightness/contrast jitter (``cfg`` strengths, all
    three scaled by ``cfg.aug_strength``; strength 0 leaves the flips only)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
    import albumentations as A  # here, not at the top: normalize() is used where it is not installed
    import cv2

    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.aug_strength == 0:
        return A.Compose(flips, seed=seed)
    rotate_deg, shift, jitter = (cfg.aug_strength * v for v in (cfg.rotate_deg, cfg.translate_frac, cfg.jitter_strength))
    return A.Compose(
        [
            *flips,
            A.Affine(
                rotate=(-rotate_deg, rotate_deg),
                translate_percent=(-shift, shift),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                p=0.5,
            ),
            A.RandomBrightnessContrast(brightness_limit=jitter, contrast_limit=jitter, p=0.5),
        ],
        seed=seed,
    )


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` on any device -> float32 normalised with the grey ImageNet stats.

    Every channel gets the grey statistics: each is a grey MR sequence, not an RGB colour."""
    return (images_uint8.float() / 255.0 - IMAGENET_GRAY_MEAN) / IMAGENET_GRAY_STD


class AugmentedArrays(torch.utils.data.Dataset):
    """``(image, mask)`` pairs from in-memory (or memory-mapped) arrays through a pipeline."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform=None):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, mask = np.asarray(self.images[index]), np.asarray(self.masks[index])
        channels_first = image.ndim == 3
        if self.transform is not None:
            hwc = np.moveaxis(image, 0, -1) if channels_first else image
            out = self.transform(image=np.ascontiguousarray(hwc), mask=mask)
            image, mask = out["image"], out["mask"]
            image = np.moveaxis(image, -1, 0) if channels_first else image
        # copy: the arrays may be read-only views into the Ray object store or a memmap
        image = np.array(image, np.uint8)
        return torch.from_numpy(image if channels_first else image[None]), torch.from_numpy(np.array(mask, np.uint8)[None])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own augmentation stream."""
    info = torch.utils.data.get_worker_info()
    transform = info.dataset.transform
    if transform is not None:
        transform.set_random_seed(info.seed % 2**32)  # info.seed = loader seed + worker_id
