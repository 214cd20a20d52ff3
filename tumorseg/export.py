"""Export the model you take home to ONNX, with a model card.

    python -m tumorseg.export RUN_DIR|MODEL.pt [--out DIR]

Writes ``model.onnx``, ``model_card.md`` and ``model_card.json`` to ``DIR`` (default: ``RUN_DIR/export``,
or ``export/`` beside a model.pt). ``python -m tumorseg.predict DIR/model.onnx IMAGES...`` runs it.

**One graph for the whole ensemble.** The members (and, when the run's post-processing chose flip TTA,
each member on the horizontally flipped image, flipped back) run inside one graph (``ShippedModel``):

- input ``image``: float32 ``(batch, C, height, width)``, the preprocessed image (model card);
- output ``probability``: float32 ``(batch, 1, height, width)``, the mean over views of ``sigmoid(logit)``:
  the ensemble's probability at the input's size;
- output ``logits``: float32 ``(batch, V, height, width)``, each view's logits (member 0, member 0 flipped
  back, member 1, ...): tumorseg upsamples logits, not probabilities, to an image's native size, so
  this is what reproduces its native-size masks exactly (``tumorseg.shipped.native_probabilities``).

One file, one ``session.run``, and the averaging (and the TTA) cannot be left out or done differently
by whoever runs it; a file per member would let each be run alone, which nothing here needs.
The export uses torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, the default since torch
2.9; the TorchScript exporter is deprecated) with ``torch.export.Dim`` for batch, height and width, opset
18, in fp32; it is checked against torch with onnxruntime before the card is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.errors import UserError
from tumorseg.shipped import (
    ONNX_EXTRA_HINT,
    ONNX_FORMAT,
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    ONNX_OUTPUTS,
    Shipped,
    open_shipped,
)

EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
OPSET = 18
PARITY_TOLERANCE = 1e-4  # max |probability difference| onnxruntime vs torch, fp32


class ShippedModel(torch.nn.Module):
    """The members as one module: ``image -> (probability, logits)`` (see the module docstring)."""

    def __init__(self, members: list[torch.nn.Module], flip_tta: bool):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.flip_tta = flip_tta

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views, count = [], image.shape[0]
        batch = torch.cat([image, image.flip(-1)]) if self.flip_tta else image  # both views in one pass per member
        for member in self.members:
            logits = member(batch)
            views += [logits[:count], logits[count:].flip(-1)] if self.flip_tta else [logits]
        logits = torch.cat(views, 1)
        return torch.sigmoid(logits).mean(1, keepdim=True), logits


def shipped_module(shipped: Shipped) -> ShippedModel:
    """fp32, contiguous-format CPU copies of the members in one ``ShippedModel`` (evaluation mode)."""
    import copy

    members = [copy.deepcopy(m).float().cpu().to(memory_format=torch.contiguous_format).eval() for m in shipped.models]
    return ShippedModel(members, shipped.postprocess.flip_tta).eval()


def onnx_metadata(shipped: Shipped) -> dict:
    """What ``tumorseg.shipped.open_onnx`` reads back: enough to preprocess, combine and post-process."""
    return {"format": ONNX_FORMAT, "version": 1, "config": shipped.cfg.to_dict(), "postprocess": shipped.postprocess.to_dict(),
            "members": len(shipped.models), "flip_tta_in_graph": shipped.postprocess.flip_tta,
            "in_channels": shipped.in_channels, "inputs": [ONNX_INPUT], "outputs": list(ONNX_OUTPUTS)}


def export_onnx(module: ShippedModel, in_channels: int, size_px: int, path: Path, metadata: dict, opset: int = OPSET) -> None:
    """Write ``module`` to ``path`` with dynamic batch, height and width and ``metadata`` (JSON) in the file."""
    from torch.export import Dim

    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it; say so in one line
    except ImportError:
        raise UserError(f"exporting to ONNX needs onnx and onnxscript ({ONNX_EXTRA_HINT})") from None
    example = torch.zeros(2, in_channels, size_px, size_px)
    dims = {ONNX_INPUT: {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's step-by-step prints
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), None, input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                                    opset_version=opset, dynamo=True, dynamic_shapes=dims, verbose=False)
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(metadata)
    program.model.doc_string = "tumorseg segmentation model; see model_card.md beside this file"
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))  # one file below 2 GB (external data only above)


@torch.no_grad()
def parity(module: ShippedModel, path: Path, shapes: list[tuple[int, ...]], seed: int = 0) -> dict:
    """Max |difference| of ``probability`` and ``logits``, onnxruntime (CPU) vs torch (fp32), on random
    normal inputs of each shape ``(B, C, H, W)``."""
    from tumorseg.shipped import open_onnx

    session = open_onnx(path).session
    generator = torch.Generator().manual_seed(seed)
    worst = {"probability": 0.0, "logits": 0.0}
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        expected = [t.numpy() for t in module(x)]
        got = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: x.numpy()})
        for name, e, g in zip(ONNX_OUTPUTS, expected, got):
            worst[name] = max(worst[name], float(np.abs(e - g).max()))
    return {"inputs": [list(s) for s in shapes], "max_abs_diff": worst, "tolerance_probability": PARITY_TOLERANCE,
            "what": "random normal inputs, onnxruntime CPU vs torch fp32"}


def default_out(source: Path, kind: str) -> Path:
    return source / EXPORT_DIR if kind == "run" else source.parent / EXPORT_DIR


def export(source: Path, out: Path | None = None, command: str | None = None, log=print) -> Path:
    """Export ``source`` (a run folder or a model.pt) to ``out``; returns the ONNX path."""
    from tumorseg.model_card import build_card, render_markdown, write_card

    source = Path(source)
    shipped = open_shipped(source)
    if shipped.kind == "onnx":
        raise UserError(f"{source}: already an ONNX model; export takes a run folder or a model.pt")
    out = Path(out) if out is not None else default_out(source, shipped.kind)
    path = out / ONNX_FILE
    log(f"exporting {shipped.describe()}")
    module = shipped_module(shipped)
    export_onnx(module, shipped.in_channels, shipped.cfg.resize_px, path, onnx_metadata(shipped))
    size = shipped.cfg.resize_px
    check = parity(module, path, [(2, shipped.in_channels, size, size), (1, shipped.in_channels, 2 * size, size)])
    if check["max_abs_diff"]["probability"] > PARITY_TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime and torch differ by {check['max_abs_diff']['probability']:.2e} in "
                           f"probability (tolerance {PARITY_TOLERANCE:g}); the export is wrong")
    card = build_card(shipped, path, check, command or "python -m tumorseg.export " + shlex.join([str(source)]))
    write_card(out, card, render_markdown(card))
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), {out / 'model_card.md'}, {out / 'model_card.json'}; "
        f"onnxruntime vs torch: max |probability difference| {check['max_abs_diff']['probability']:.1e}")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = ArgumentParser(prog="tumorseg.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a search.run folder (its final ensemble and post-processing) or a model.pt")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export, or export/ beside a model.pt)")
    args = p.parse_args(argv)
    with exit_on_user_error("tumorseg.export"):
        export(args.source, args.out, command="python -m tumorseg.export " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
