"""The model: ``smp.create_model(arch, encoder_name=encoder, in_channels=C, classes=1)`` and its encoder weights.

``arch`` and ``encoder`` are smp's own names (``TrainConfig.arch`` / ``.encoder``; the seed
recipe is Unet + resnet18); ``check_model`` checks them against smp's registries and the
training size against the encoder's output stride, with one-line errors.

``encoder_weights`` is ``"imagenet"`` (the recipe; or another weights name smp lists for the
encoder, e.g. ``advprop``), ``"none"`` (random init), a weights file, or a folder holding one
file per encoder named ``<encoder>.safetensors`` (or ``.pth``/``.pt``). Hub weights come from
the Hugging Face hub (``smp-hub/<encoder>.<weights>``) the way smp fetches them, but resolved here
first so that an offline machine fails in well under a second with the exact ``hf download``
command instead of retrying for ~23 s, and so a search driver can resolve the weights of every
encoder in its space once and ship the tensors to every trial (``load_encoder_states``).
"""

from __future__ import annotations

import difflib
import socket
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from tumorseg.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")  # a --encoder-weights folder: <encoder><suffix>


# ----------------------------------------------------------------------------- names and strides


def arch_names() -> list[str]:
    """smp's architectures, spelled as its classes (``Unet``, ``DeepLabV3Plus``, ...)."""
    import segmentation_models_pytorch as smp

    return [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]


def encoder_names() -> list[str]:
    """smp's own encoders (``tu-<timm model>`` names are accepted besides these)."""
    from segmentation_models_pytorch.encoders import get_encoder_names

    return list(get_encoder_names())


def _unknown(kind: str, name: str, known: list[str], flag: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5) or difflib.get_close_matches(
        name.lower(), [k.lower() for k in known], n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(known[:12])}, ..."
    return ConfigError(f"{flag}: unknown smp {kind} {name!r}; {hint}")


def check_arch(arch: str, flag: str = "--arch") -> None:
    if arch not in arch_names():
        raise _unknown("architecture", arch, arch_names(), flag)


def check_encoder(encoder: str, flag: str = "--encoder") -> None:
    if encoder.startswith("tu-"):
        import timm

        if not timm.list_models(encoder[3:].split(".")[0]):
            raise _unknown("timm encoder", encoder, ["tu-" + m for m in timm.list_models()], flag)
        return
    if encoder not in encoder_names():
        raise _unknown("encoder", encoder, encoder_names(), flag)


def build(arch: str, encoder: str, in_channels: int = 1) -> nn.Module:
    """The randomly initialised model; an arch/encoder pair smp refuses is a ``ConfigError``."""
    import segmentation_models_pytorch as smp

    check_arch(arch)
    check_encoder(encoder)
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=1)
    except (ValueError, KeyError, AttributeError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--arch {arch} --encoder {encoder}: smp cannot build this pair ({first})") from None


def output_stride(model: nn.Module) -> int:
    """The factor by which the encoder shrinks its input (32 for most; 16 for DeepLabV3Plus, 8 for PSPNet)."""
    return int(model.encoder.output_stride)


def check_model(arch: str, encoder: str, resizes_px, flag: str = "--resize") -> int:
    """Check the names and that every training size is a multiple of the encoder's output stride
    (smp refuses other sizes at the first forward pass); returns the stride."""
    stride = output_stride(build(arch, encoder))
    for size in [resizes_px] if isinstance(resizes_px, int) else resizes_px:
        if size % stride:
            raise ConfigError(f"{flag} {size}: {arch}-{encoder} downsamples by {stride}; use a multiple of {stride} "
                              f"(e.g. {max(stride, size // stride * stride)} or {(size // stride + 1) * stride})")
    return stride


# ----------------------------------------------------------------------------- weights


def hub_file(encoder: str, weights: str = "imagenet") -> tuple[str, str, str]:
    """``(repo_id, revision, filename)`` smp uses for ``encoder``'s ``weights``."""
    from segmentation_models_pytorch.encoders import encoders

    listed = encoders[encoder]["pretrained_settings"] if encoder in encoders else {}
    if weights not in listed:
        offer = ", ".join(listed) or "none"
        raise ConfigError(f"--encoder-weights {weights}: smp lists no such weights for encoder {encoder} (it has: {offer}); "
                          f"use --encoder-weights none or a weights file/folder")
    settings = listed[weights]
    return settings["repo_id"], settings["revision"], "model.safetensors"


def imagenet_hub_file(encoder: str = "resnet18") -> tuple[str, str, str]:
    return hub_file(encoder, "imagenet")


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


def _file_in_folder(folder: Path, encoder: str) -> Path:
    for suffix in WEIGHT_SUFFIXES:
        if (folder / f"{encoder}{suffix}").is_file():
            return folder / f"{encoder}{suffix}"
    names = " or ".join(f"{encoder}{s}" for s in WEIGHT_SUFFIXES)
    raise ConfigError(f"--encoder-weights: {folder} has no weights for encoder {encoder} (expected {names})")


def _hub_weights(encoder: str, weights: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if encoder.startswith("tu-"):
        raise ConfigError(f"--encoder-weights {weights}: timm encoder {encoder} takes its weights from timm, which this "
                          f"project does not fetch; pass a folder with {encoder}.safetensors or --encoder-weights none")
    repo_id, revision, filename = hub_file(encoder, weights)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not _hub_reachable():
        raise ConfigError(
            f"--encoder-weights {weights}: the {encoder} weights are not in the Hugging Face cache and the hub "
            f"cannot be reached. On a machine with internet run `hf download {repo_id} {filename} "
            f"--revision {revision}` and copy its HF cache (~/.cache/huggingface, or set HF_HOME) here, "
            f"or pass a weights file or folder with --encoder-weights PATH, or train from scratch with "
            f"--encoder-weights none"
        )
    return Path(hf_hub_download(repo_id, filename, revision=revision))


def resolve_encoder_weights(spec: str, encoder: str = "resnet18", only_encoder: bool = True) -> Path | None:
    """The local weights file of ``encoder`` for ``spec`` (downloading hub weights if needed), or None.

    A single file serves one encoder only (``only_encoder``: it is the only one in play)."""
    if spec == "none":
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return _file_in_folder(path, encoder)
    if path.is_file():
        if not only_encoder:
            raise ConfigError(f"--encoder-weights {spec}: one file cannot serve several encoders; give a folder "
                              f"with one <encoder>.safetensors (or .pth) per encoder")
        return path
    if "/" in spec or Path(spec).suffix in WEIGHT_SUFFIXES:
        raise ConfigError(f"--encoder-weights: no such file or folder {spec!r} (expected imagenet, none or a path)")
    return _hub_weights(encoder, spec)


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


def load_encoder_state(spec: str, encoder: str = "resnet18") -> dict[str, torch.Tensor] | None:
    """Resolve ``spec`` for ``encoder`` and read its tensors (None for ``"none"``)."""
    path = resolve_encoder_weights(spec, encoder)
    return None if path is None else read_encoder_state(path)


def load_encoder_states(spec: str, encoders) -> dict[str, dict[str, torch.Tensor]]:
    """``{encoder: tensors}`` for every encoder of a sweep, resolved once by its driver ({} for ``"none"``)."""
    encoders = list(dict.fromkeys(encoders))
    if spec == "none":
        return {}
    paths = {e: resolve_encoder_weights(spec, e, only_encoder=len(encoders) == 1) for e in encoders}  # all found first
    return {e: read_encoder_state(path) for e, path in paths.items()}


# ----------------------------------------------------------------------------- the model


def first_conv_name(module: nn.Module) -> str:
    """The name of ``module``'s first convolution (what smp patches for another channel count)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return name
    raise ConfigError(f"{type(module).__name__} has no convolution")


def in_channels_of(model: nn.Module) -> int:
    """The channel count a model takes (its encoder's first convolution's input channels)."""
    return int(model.encoder.get_submodule(first_conv_name(model.encoder)).in_channels)


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 3-channel first-conv weight adapted to ``in_channels`` exactly as smp 0.6 does it
    (``encoders._utils.patch_first_conv``): summed over RGB for 1 channel (exact for a grey image
    replicated to RGB); otherwise channel ``i`` takes the RGB filter ``i % 3``, all scaled by
    ``3 / in_channels`` so a constant input gives the same response."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ConfigError(f"--encoder-weights: the first conv has {weight.shape[1]} input channels; cannot adapt it to {in_channels}")
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    return weight[:, [i % 3 for i in range(in_channels)]] * (3 / in_channels)


def create_model(encoder_state: dict[str, torch.Tensor] | None = None, in_channels: int = 1,
                 arch: str = "Unet", encoder: str = "resnet18") -> nn.Module:
    """``arch`` with ``encoder`` for ``in_channels``-channel input and 1 logit per pixel.

    ``encoder_state``: the encoder's weights (pre-resolved, e.g. ImageNet); a first convolution
    with another channel count is adapted with ``adapt_first_conv`` (smp's rule).
    """
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    model = build(arch, encoder, in_channels)
    if encoder_state is not None:
        state = dict(encoder_state)
        key = first_conv_name(model.encoder) + ".weight"
        if key in state:
            state[key] = adapt_first_conv(state[key], in_channels)
        try:
            model.encoder.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(f"--encoder-weights: not {encoder} encoder weights ({first})") from None
    return model


def cost(model: nn.Module, size_px: int) -> dict[str, float]:
    """Parameters (millions) and GFLOPs of one forward pass of one image at ``size_px`` (CPU, fp32;
    counted by ``torch.utils.flop_counter``: a multiply-add is 2 FLOPs)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    x = torch.zeros(1, in_channels_of(probe), size_px, size_px)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(x)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": counter.get_total_flops() / 1e9}
