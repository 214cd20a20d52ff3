"""Model files (``model.pt``) and copies of training state, always with plain state-dict keys.

``torch.compile`` wraps a model in an ``OptimizedModule`` whose state dict prefixes every key with
``_orig_mod.`` (Accelerate's ``unwrap_model`` keeps that wrapper by default). ``plain_state_dict``
takes the state of the module inside, so a model file or resume state from a ``--compile`` run
loads into a plain ``create_model()``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tumorseg.config import TrainConfig
from tumorseg.errors import UserError
from tumorseg.model import create_model, in_channels_of

MODEL_FORMAT = "tumorseg-model"


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile``'s wrapper (the model itself when not compiled)."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # OptimizedModule, any backend
        model = model._orig_mod
    return model


def plain_state_dict(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` without ``_orig_mod.`` prefixes (tensors shared, not copied)."""
    return uncompiled(model).state_dict()


def to_cpu_copy(tree):
    """Deep copy of a (nested) state dict with every tensor cloned to CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: to_cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu_copy(v) for v in tree)
    return copy.deepcopy(tree)


def in_channels(model: torch.nn.Module) -> int:
    """The channel count a model takes (its first convolution's input channels)."""
    return in_channels_of(uncompiled(model))


def save_model(path: Path, model: torch.nn.Module, cfg: TrainConfig, **extra: Any) -> None:
    """Weights + config (arch and encoder included) + input channels + metadata, all plain types:
    loadable with ``weights_only=True``; ``load_model`` rebuilds the architecture from them."""
    state = {k: v.detach().cpu() for k, v in plain_state_dict(model).items()}
    payload = {"format": MODEL_FORMAT, "version": 1, "config": cfg.to_dict(), "arch": cfg.arch, "encoder": cfg.encoder,
               "in_channels": in_channels(model), "model": state}
    torch.save({**payload, **extra}, path)


def load_model(path: Path) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Read a ``model.pt`` written by ``save_model``; refuse anything else (never unpickles code)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model file not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - pickled code, garbage, truncation: all "not ours"
        raise UserError(f"{path}: not a tumorseg model file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a tumorseg model file (no '{MODEL_FORMAT}' marker)")
    cfg = TrainConfig.from_dict(payload["config"])
    # files from before channels were grey; from before archs, Unet-resnet18 (the config's defaults)
    model = create_model(None, in_channels=int(payload.get("in_channels", 1)), arch=cfg.arch, encoder=cfg.encoder)
    model.load_state_dict(payload["model"])
    if cfg.channels_last:  # as trained: the memory format changes the float rounding
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), cfg, payload
