"""Running a trained model: input preparation, logits, the one threshold, native-size masks.

Validation (every epoch, selects the best epoch), the test pass of ``write_run_outputs``,
``tumorseg.predict`` and the overlays of ``tumorseg.visualize`` all go through this module, so they
see the same numbers:

- **One evaluation precision.** Evaluation runs under the training precision: bf16 autocast where
  ``cfg.precision`` allows it and the device supports it (``uses_bf16``), else fp32. Validation runs
  every epoch of every trial of a sweep, so it should cost what a training forward costs; evaluating
  the test split (and a reloaded ``model.pt``) the same way means the numbers that selected the
  model are the numbers it reports, bit for bit on the same device. (fp32 everywhere would also be
  consistent, but slows every validation pass and needs the training model's autocast wrapper
  taken off and put back each epoch.)
- **One threshold.** A pixel is tumour when its probability is above ``cfg.threshold``
  (``mask_from_logits``); decided on the logits (``logit > log(t / (1 - t))``), the same test
  without a sigmoid per pixel. ``tumorseg.metrics`` uses the same function.
- **Native size.** Logits are upsampled bilinearly to an image's native size (``to_native``)
  before thresholding wherever a native-resolution mask is wanted.
- **Probabilities, ensembles, flip TTA** (the final stage and its post-processing,
  ``tumorseg.postprocess``): ``predict_probabilities`` gives ``sigmoid(to_native(logits))``;
  ``flip_tta`` averages it with the model's output on the horizontally flipped image, flipped back;
  an ensemble is the mean of its members' probabilities (not of their logits).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from tumorseg.config import TrainConfig
from tumorseg.transforms import normalize


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 fast enough to train in it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPU: oneDNN bf16 kernels need AVX512-BF16 or AMX; elsewhere bf16 is slower than fp32
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """The precision policy: bf16 autocast unless ``cfg.precision`` is fp32 or the device lacks bf16."""
    return cfg.precision != "fp32" and bf16_supported(torch.device(device))


def eval_autocast(cfg: TrainConfig, device: torch.device):
    """The autocast context of every evaluation forward pass (validation, test, predict)."""
    device = torch.device(device)
    if uses_bf16(cfg, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> normalised float on ``device`` (non-blocking from pinned memory)."""
    x = normalize(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 images as a ``(B, C, S, S)`` tensor: ``(B, S, S)`` gains its channel axis (a copy:
    the arrays may be read-only memory maps)."""
    images = np.array(images, np.uint8)
    return torch.from_numpy(images[:, None] if images.ndim == 3 else images)


def forward_logits(model: torch.nn.Module, images: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """fp32 logits ``(B, 1, S, S)`` of uint8 images ``(B, S, S)`` or ``(B, C, S, S)``, under the
    evaluation precision."""
    device = model_device(model)
    x = to_input(as_batch(images), device, cfg.channels_last)
    with eval_autocast(cfg, device):
        return model(x).float()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """Logits at training resolution for uint8 ``(N, [C,] S, S)`` images, in ``eval_batch_size`` chunks."""
    model.eval()
    chunks = [forward_logits(model, images[start : start + cfg.eval_batch_size], cfg)
              for start in range(0, len(images), cfg.eval_batch_size)]
    return torch.cat(chunks)


def to_native(logits: torch.Tensor, native_hw: tuple[int, int]) -> torch.Tensor:
    """Logits ``(B, 1, S, S)`` upsampled bilinearly to the native ``(H, W)``."""
    return F.interpolate(logits, size=tuple(native_hw), mode="bilinear", align_corners=False)


def mask_from_logits(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask: probability ``sigmoid(logit) > threshold`` (strict), decided on the logits."""
    return logits > math.log(threshold / (1 - threshold))


@torch.no_grad()
def predict_masks(model: torch.nn.Module, images: np.ndarray, cfg: TrainConfig, native_hw=None) -> np.ndarray:
    """uint8 {0, 1} masks ``(N, H, W)``: at ``native_hw`` if given, else at training resolution."""
    logits = predict_logits(model, images, cfg)
    if native_hw is not None:
        logits = to_native(logits, native_hw)
    return mask_from_logits(logits, cfg.threshold)[:, 0].to(torch.uint8).cpu().numpy()



def batch_probabilities(model: torch.nn.Module, images: np.ndarray, cfg: TrainConfig, native_hw=None) -> torch.Tensor:
    """fp32 probabilities ``(B, H, W)`` of one batch at ``native_hw`` (None: training resolution)."""
    logits = forward_logits(model, images, cfg)
    return torch.sigmoid(to_native(logits, native_hw) if native_hw is not None else logits)[:, 0]


@torch.no_grad()
def mean_probabilities(models: list, images: np.ndarray, cfg: TrainConfig, native_hw=None) -> np.ndarray:
    """float32 ``(N, H, W)``: the mean over ``models`` of each one's probabilities, in
    ``cfg.eval_batch_size`` chunks (members are evaluated chunk by chunk: one output array)."""
    models = list(models)
    for model in models:
        model.eval()
    hw = tuple(native_hw) if native_hw is not None else tuple(images.shape[-2:])
    out = np.empty((len(images), *hw), np.float32)
    for start in range(0, len(images), cfg.eval_batch_size):
        batch = images[start : start + cfg.eval_batch_size]
        total = sum(batch_probabilities(m, batch, cfg, native_hw).cpu() for m in models)
        out[start : start + len(batch)] = (total / len(models)).numpy()
    return out


def mirrored_probabilities(models: list, images: np.ndarray, cfg: TrainConfig, native_hw=None) -> np.ndarray:
    """``mean_probabilities`` of the horizontally flipped images, flipped back."""
    return np.ascontiguousarray(mean_probabilities(models, np.asarray(images)[..., ::-1], cfg, native_hw)[..., ::-1])


def with_flip_tta(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Flip TTA from the two halves: ``(plain + mirrored) / 2``, written over ``mirrored`` (no third array)."""
    np.add(plain, mirrored, out=mirrored)
    mirrored *= np.float32(0.5)
    return mirrored


def predict_probabilities(models: list, images: np.ndarray, cfg: TrainConfig, native_hw=None,
                          flip_tta: bool = False) -> np.ndarray:
    """float32 probabilities ``(N, H, W)`` of uint8 ``(N, [C,] S, S)`` images at ``native_hw``
    (None: training resolution): the mean over ``models`` (an ensemble; one model is a list of one)
    of each member's probabilities; ``flip_tta``: the mean of that on the image and on its
    horizontal flip, flipped back (= every member's flip TTA, averaged)."""
    plain = mean_probabilities(models, images, cfg, native_hw)
    return with_flip_tta(plain, mirrored_probabilities(models, images, cfg, native_hw)) if flip_tta else plain
