"""The model you take home, from any of its three forms: what ``tumorseg.predict`` and ``tumorseg.export`` load.

- a **run folder** of ``search.run``: its ensemble ``final/model/member<k>.pt`` and its post-processing
  ``final/postprocess.json`` (``tumorseg.postprocess.load_final_model``);
- a **model.pt** (``tumorseg.train``, one retrain seed): one member, no post-processing beyond its
  configuration's threshold;
- a **model.onnx** written by ``tumorseg.export``: run by onnxruntime on the CPU; its configuration and
  post-processing travel in the file's metadata.

All three give the same probabilities (``probabilities``): per view (a member, or a member on the
horizontally flipped image when flip TTA was chosen) the logits at the model's size, upsampled
bilinearly to the image's native size, then the sigmoid, then the mean over views. The torch forms go
through ``tumorseg.inference.predict_probabilities`` (the path of validation and test, in their
evaluation precision); the ONNX form runs the exported graph (fp32) and combines its ``logits``
output the same way, here (``native_probabilities``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tumorseg.config import TrainConfig
from tumorseg.errors import UserError

ONNX_INPUT = "image"
ONNX_OUTPUTS = ("probability", "logits")
ONNX_METADATA_KEY = "tumorseg"  # metadata_props key of the JSON that tumorseg.predict reads
ONNX_FORMAT = "tumorseg-onnx"
ONNX_EXTRA_HINT = "pip install 'tumorseg[onnx]'"


@dataclass
class Shipped:
    """A loaded model in one of its three forms (``kind``: ``run``, ``model`` or ``onnx``)."""

    kind: str
    path: Path
    cfg: TrainConfig
    postprocess: object  # tumorseg.postprocess.PostProcess
    in_channels: int
    models: list = field(default_factory=list)  # torch members (kind run / model)
    member_files: list[Path] = field(default_factory=list)
    session: object = None  # onnxruntime.InferenceSession (kind onnx)
    metadata: dict = field(default_factory=dict)  # what the ONNX file carries

    @property
    def members(self) -> int:
        return len(self.models) if self.session is None else int(self.metadata["members"])

    def describe(self) -> str:
        size = f"{self.cfg.arch}-{self.cfg.encoder} at {self.cfg.resize_px} px"
        what = {"run": f"run folder, {self.members} member(s)", "model": "model.pt", "onnx": f"ONNX, {self.members} member(s)"}
        return f"{self.path} ({what[self.kind]}, {size}; post-processing: {self.postprocess.describe()})"


def source_kind(path: Path) -> str:
    """``run``, ``model`` or ``onnx`` for a SOURCE argument; a one-line error for anything else."""
    path = Path(path)
    if path.is_dir():
        return "run"
    if not path.exists():
        what = "model file" if path.suffix.lower() in (".pt", ".pth", ".onnx") else "model source"
        raise UserError(f"{what} not found: {path}")
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() in (".pt", ".pth"):
        return "model"
    raise UserError(f"{path}: not a model source (expected a run folder, a model.pt or a model.onnx)")


def final_dir(run_dir: Path) -> Path:
    """A run folder's ``final/`` (``run_dir`` itself when it is one)."""
    return run_dir if (run_dir / "model").is_dir() else run_dir / "final"


def open_shipped(path: Path, device: str | torch.device = "cpu") -> Shipped:
    """Load a run folder, a model.pt or a model.onnx (``device``: where torch members run)."""
    from tumorseg.checkpoint import in_channels, load_model
    from tumorseg.postprocess import PostProcess, load_final_model, member_files

    path = Path(path)
    kind = source_kind(path)
    if kind == "onnx":
        return open_onnx(path)
    if kind == "run":
        final = final_dir(path)
        if not any((final / "model").glob("member*.pt")):
            hint = (f"; its {final / 'model.pt'} (from before ensembles) is one model: give that" if (final / "model.pt").is_file()
                    else "; give a run folder, a model.pt or a model.onnx")
            raise UserError(f"{path}: no final model (no {final / 'model'}/member<k>.pt: not a search.run folder, or its "
                            f"final stage has not run){hint}")
        models, cfg, pp = load_final_model(path)
        files = member_files(final)
    else:
        model, cfg, _ = load_model(path)
        models, pp, files = [model], PostProcess(threshold=cfg.threshold), [path]
    models = [m.to(device) for m in models]
    return Shipped(kind, path, cfg, pp, in_channels(models[0]), models=models, member_files=files)


def open_onnx(path: Path) -> Shipped:
    """An ONNX file written by ``tumorseg.export``: an onnxruntime CPU session and its metadata."""
    from tumorseg.postprocess import PostProcess

    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"{path}: running an ONNX model needs onnxruntime ({ONNX_EXTRA_HINT})") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no graph-optimisation chatter on the terminal
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own types for garbage, truncation, bad graphs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable ONNX model ({first[:200]})") from None
    try:
        metadata = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
        if metadata["format"] != ONNX_FORMAT:
            raise ValueError(metadata["format"])
        cfg = TrainConfig.from_dict(metadata["config"])
        pp = PostProcess.from_dict(metadata["postprocess"])
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: not a tumorseg ONNX export (no '{ONNX_METADATA_KEY}' metadata; "
                        "make one with python -m tumorseg.export)") from None
    return Shipped("onnx", path, cfg, pp, int(metadata["in_channels"]), session=session, metadata=metadata)


def model_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``(B, [C,] S, S)`` -> the graph's float32 ``(B, C, S, S)`` input: ``(x / 255 - mean) / std``
    (``tumorseg.transforms.normalize``, the training normalisation)."""
    from tumorseg.inference import as_batch
    from tumorseg.transforms import normalize

    return normalize(as_batch(images)).numpy()


def native_probabilities(view_logits: torch.Tensor, native_hw: tuple[int, int]) -> np.ndarray:
    """float32 ``(B, H, W)``: each view's logits ``(B, V, S, S)`` upsampled to ``native_hw`` (as
    ``tumorseg.inference.to_native``), the sigmoid, the mean over views."""
    from tumorseg.inference import to_native

    return torch.sigmoid(to_native(view_logits, native_hw)).mean(1).numpy()


@torch.no_grad()
def probabilities(shipped: Shipped, images: np.ndarray, native_hws: list[tuple[int, int]]) -> list[np.ndarray]:
    """float32 ``(H, W)`` probability maps of uint8 ``(B, [C,] S, S)`` images, each at its native size."""
    if shipped.session is not None:
        logits = shipped.session.run([ONNX_OUTPUTS[1]], {ONNX_INPUT: model_input(images)})[0]
        return [native_probabilities(torch.from_numpy(logits[i : i + 1]), hw)[0] for i, hw in enumerate(native_hws)]
    from tumorseg.inference import predict_probabilities

    out: list[np.ndarray | None] = [None] * len(images)
    for hw in dict.fromkeys(map(tuple, native_hws)):  # one pass per native size in the batch
        rows = [i for i, other in enumerate(native_hws) if tuple(other) == hw]
        probs = predict_probabilities(shipped.models, images[rows], shipped.cfg, hw, flip_tta=shipped.postprocess.flip_tta)
        for i, p in zip(rows, probs):
            out[i] = p
    return out
