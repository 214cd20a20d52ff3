"""The model: ``smp.Unet("resnet18", in_channels=C, classes=1)`` (C: the dataset's channels) and its encoder weights.

``encoder_weights`` is ``"imagenet"`` (the recipe), ``"none"`` (random init) or a path to a
weights file. ImageNet weights come from the Hugging Face hub (``smp-hub/resnet18.imagenet``) the
way smp fetches them, but resolved here first so that an offline machine fails in well under a
second with instructions instead of retrying for ~23 s, and so a search driver can resolve them
once and ship the tensors to every trial (``load_encoder_state``).
"""

from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from tumorseg.errors import ConfigError

ENCODER = "resnet18"


def imagenet_hub_file() -> tuple[str, str, str]:
    """``(repo_id, revision, filename)`` smp uses for the ResNet18 ImageNet weights."""
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[ENCODER]["pretrained_settings"]["imagenet"]
    return settings["repo_id"], settings["revision"], "model.safetensors"


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_encoder_weights(spec: str) -> Path | None:
    """The local weights file for ``spec`` (downloading ImageNet weights if needed), or None."""
    if spec == "none":
        return None
    if spec != "imagenet":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"--encoder-weights: no such file {spec!r} (expected imagenet, none or a weights file)")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision, filename = imagenet_hub_file()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not _hub_reachable():
        raise ConfigError(
            f"--encoder-weights imagenet: the weights are not in the Hugging Face cache and the hub "
            f"cannot be reached. On a machine with internet run `hf download {repo_id} {filename} "
            f"--revision {revision}` and copy its HF cache (~/.cache/huggingface, or set HF_HOME) here, "
            f"or pass a weights file with --encoder-weights PATH, or train from scratch with "
            f"--encoder-weights none"
        )
    return Path(hf_hub_download(repo_id, filename, revision=revision))


def read_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """Encoder tensors from a ``.safetensors`` file, an encoder state dict, or one of our
    ``model.pt`` files (its ``encoder.*`` entries). Never unpickles arbitrary objects."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a weights file"
        raise ConfigError(f"--encoder-weights: {path} is not a readable weights file ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a tumorseg model.pt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--encoder-weights: {path} does not hold a state dict of tensors")
    if any(key.startswith("encoder.") for key in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet classifier head


def load_encoder_state(spec: str) -> dict[str, torch.Tensor] | None:
    """Resolve ``spec`` and read its tensors (None for ``"none"``)."""
    path = resolve_encoder_weights(spec)
    return None if path is None else read_encoder_state(path)


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 3-channel ``conv1`` weight adapted to ``in_channels`` exactly as smp 0.6 does it
    (``encoders._utils.patch_first_conv``): summed over RGB for 1 channel (exact for a grey image
    replicated to RGB); otherwise channel ``i`` takes the RGB filter ``i % 3``, all scaled by
    ``3 / in_channels`` so a constant input gives the same response."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ConfigError(f"--encoder-weights: conv1 has {weight.shape[1]} input channels; cannot adapt it to {in_channels}")
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    return weight[:, [i % 3 for i in range(in_channels)]] * (3 / in_channels)


def create_model(encoder_state: dict[str, torch.Tensor] | None = None, in_channels: int = 1) -> nn.Module:
    """UNet-ResNet18 for ``in_channels``-channel input and 1 logit per pixel.

    ``encoder_state``: ResNet18 weights (pre-resolved, e.g. ImageNet); a first convolution with
    another channel count is adapted with ``adapt_first_conv`` (smp's rule).
    """
    import segmentation_models_pytorch as smp

    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    model = smp.Unet(ENCODER, encoder_weights=None, in_channels=in_channels, classes=1)
    if encoder_state is not None:
        state = dict(encoder_state)
        conv1 = state.get("conv1.weight")
        if conv1 is not None:
            state["conv1.weight"] = adapt_first_conv(conv1, in_channels)
        try:
            model.encoder.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(f"--encoder-weights: not ResNet18 encoder weights ({first})") from None
    return model
