"""The model card beside an exported model: ``model_card.json`` (everything) and ``model_card.md`` (to read).

What it holds: where the model came from (files and their sha256), how to feed the ONNX graph (the
preprocessing, exactly), what comes out and how tumorseg turns it into masks (native size,
post-processing), the data it was trained and tested on (fingerprint, split sizes), its
configuration, its test metrics beside the baselines (``final/metrics.json`` of a run, or the
``metrics.json`` beside a model.pt, copied whole; the card's table lists every entry that carries
Dice/IoU/F1/precision/recall), package versions and the command that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tumorseg.imageio import IMAGE_SUFFIXES, NORMALISATION
from tumorseg.shipped import ONNX_INPUT, ONNX_OUTPUTS, Shipped, final_dir
from tumorseg.transforms import IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD

CARD_FORMAT = "tumorseg-model-card"
METRIC_COLUMNS = ("dice", "iou", "f1", "precision", "recall")
SKIP_KEYS = {"config", "params", "dataset", "selection", "history", "notes", "metric_definitions"}
VERSIONED = ("tumorseg", "torch", "segmentation-models-pytorch", "numpy", "pillow", "onnx", "onnxruntime", "onnxscript")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def metrics_file(shipped: Shipped) -> Path | None:
    """``final/metrics.json`` of a run folder, or ``metrics.json`` beside a model.pt (None if absent)."""
    if shipped.kind == "run":
        path = final_dir(shipped.path) / "metrics.json"
    else:
        path = shipped.path.parent / "metrics.json"
    return path if path.is_file() else None


def dataset_of(shipped: Shipped, metrics: dict | None) -> dict | None:
    """The ``DatasetInfo`` dict: from the metrics file, else from member 0's model.pt."""
    if metrics and isinstance(metrics.get("dataset"), dict):
        return metrics["dataset"]
    import torch

    payload = torch.load(shipped.member_files[0], map_location="cpu", weights_only=True, mmap=True)
    return payload.get("dataset")


def preprocessing(shipped: Shipped) -> dict:
    cfg, channels = shipped.cfg, shipped.in_channels
    stride = int(shipped.models[0].encoder.output_stride)
    return {
        "decode": f"image files ({', '.join(IMAGE_SUFFIXES)}) to uint8: {NORMALISATION}",
        "channels": (f"{channels}: colour images are converted to grey (PIL 'L', luma)" if channels == 1
                     else f"{channels}: each band of the file is a channel, in file order"),
        "resize": (f"to {cfg.resize_px} x {cfg.resize_px} px (square; aspect ratio not kept), bilinear (PIL), on the uint8 image"
                   + ("; a JPEG is first decoded by PIL's draft mode (Image.draft('L', (S, S)): DCT scaling by 1/2, 1/4 or 1/8 "
                      "while both sides stay >= S), as tumorseg.imageio.decode_gray does" if channels == 1 else
                      ", each channel on its own")),
        "scale": f"x / 255, then (x - {IMAGENET_GRAY_MEAN:.6f}) / {IMAGENET_GRAY_STD:.6f} on every channel (grey ImageNet statistics)",
        "layout": f"float32 NCHW (batch, {channels}, height, width)",
        "size_px": cfg.resize_px,
        "mean": IMAGENET_GRAY_MEAN,
        "std": IMAGENET_GRAY_STD,
        "output_stride": stride,
        "sizes": (f"the model was trained at {cfg.resize_px} x {cfg.resize_px} and tumorseg always feeds that size; the graph "
                  f"takes any batch, height and width, but use multiples of {stride} (the encoder's output stride: other "
                  f"sizes are refused by most smp architectures and were never trained on)"),
    }


def outputs(shipped: Shipped) -> dict:
    pp = shipped.postprocess
    views = len(shipped.models) * (2 if pp.flip_tta else 1)
    order = ", ".join(f"member {k}" + (f", member {k} flipped back" if pp.flip_tta else "") for k in range(len(shipped.models)))
    return {
        ONNX_OUTPUTS[0]: "float32 (batch, 1, height, width): mean over the views of sigmoid(logits), at the input's size",
        ONNX_OUTPUTS[1]: f"float32 (batch, {views}, height, width): each view's logits, in order: {order}",
        "native_size": ("tumorseg's masks at an image's native H x W: upsample each logits view bilinearly to H x W "
                        "(half-pixel centres: torch align_corners=False, ONNX Resize coordinate_transformation_mode "
                        "half_pixel, no antialias), sigmoid, mean over the views; then post-processing. Upsampling "
                        "'probability' instead moves boundary pixels slightly."),
        "post_processing": ("pixel is tumour when probability > threshold (strict); then, as chosen: remove 8-connected "
                            "components below min_component_px, keep the largest, fill each to its bounding box "
                            "(tumorseg.postprocess.apply_postprocess)"),
    }


def build_card(shipped: Shipped, onnx_path: Path, parity: dict, command: str) -> dict:
    """Everything the card says, as one JSON-able dict."""
    metrics_path = metrics_file(shipped)
    metrics = json.loads(metrics_path.read_text()) if metrics_path else None
    cfg, pp = shipped.cfg, shipped.postprocess
    members = len(shipped.models)
    return {
        "format": CARD_FORMAT,
        "version": 1,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "cwd": os.getcwd(),
        "source": {"kind": shipped.kind, "path": str(shipped.path),
                   "member_files": [{"path": str(p), "sha256": sha256(p)} for p in shipped.member_files]},
        "model": {"arch": cfg.arch, "encoder": cfg.encoder, "in_channels": shipped.in_channels, "resize_px": cfg.resize_px,
                  "members": members,
                  "ensemble": ("one ONNX graph: every member (and its flipped pass when flip TTA is on) inside, "
                               "'probability' = the mean of their probabilities (the mean tumorseg uses)")},
        "onnx": {"file": onnx_path.name, "sha256": sha256(onnx_path), "bytes": onnx_path.stat().st_size,
                 "opset": _opset(onnx_path), "input": {ONNX_INPUT: f"float32 (batch, {shipped.in_channels}, height, width)"},
                 "outputs": outputs(shipped), "flip_tta_in_graph": pp.flip_tta, "precision": "fp32",
                 "parity": parity},
        "preprocessing": preprocessing(shipped),
        "postprocess": {**pp.to_dict(), "describe": pp.describe(),
                        "chosen_on": "validation" if shipped.kind == "run" else "none: the configuration's threshold"},
        "data": dataset_of(shipped, metrics),
        "config": cfg.to_dict(),
        "evaluation_precision": (f"The test metrics were computed with precision '{cfg.precision}' (bf16 autocast where "
                                 "the device supports it, else fp32); the ONNX graph runs in fp32"),
        "metrics_file": str(metrics_path) if metrics_path else None,
        "metrics": metrics,
        "versions": package_versions(),
    }


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def write_card(out: Path, card: dict, markdown: str) -> None:
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    (out / "model_card.md").write_text(markdown)


# ----------------------------------------------------------------------------- markdown


def metric_rows(tree, path: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``(label, {metric: value})`` for every dict in ``tree`` holding one of ``METRIC_COLUMNS``
    (a number, or ``{"mean", "std"}`` over seeds); the label is its key path."""
    if not isinstance(tree, dict):
        return []
    row = {k: tree[k] for k in METRIC_COLUMNS if _is_metric(tree.get(k))}
    rows = [(" / ".join(path) or "metrics", row)] if row else []
    for key, value in tree.items():
        if key not in SKIP_KEYS and key not in METRIC_COLUMNS:
            rows += metric_rows(value, (*path, str(key)))
    return rows


def _is_metric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, dict) and "mean" in value


def _format(value) -> str:
    if isinstance(value, dict):
        std = value.get("std") or 0.0
        return f"{value['mean']:.4f} ± {std:.4f}" if std else f"{value['mean']:.4f}"
    return f"{value:.4f}" if np.isfinite(value) else str(value)


def metrics_table(metrics: dict | None) -> list[str]:
    rows = metric_rows(metrics or {})
    if not rows:
        return ["No test metrics were recorded with this model."]
    columns = [c for c in METRIC_COLUMNS if any(c in r for _, r in rows)]
    lines = ["| entry | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {label} | " + " | ".join(_format(r[c]) if c in r else "" for c in columns) + " |" for label, r in rows]
    return lines


def render_markdown(card: dict) -> str:
    model, onnx, pre, pp, data = card["model"], card["onnx"], card["preprocessing"], card["postprocess"], card["data"] or {}
    members = model["members"]
    lines = [
        f"# Model card: {model['arch']}-{model['encoder']} brain-tumour segmentation"
        + (f" (ensemble of {members})" if members > 1 else ""),
        "",
        (f"Made {card['created_utc']} by `{card['command']}` (in `{card['cwd']}`) from {card['source']['kind']} "
         f"`{card['source']['path']}`."),
        "",
        "## Files",
        "",
        f"- `{onnx['file']}`: ONNX opset {onnx['opset']}, fp32, {onnx['bytes'] / 2**20:.1f} MiB, sha256 `{onnx['sha256']}`",
        *[f"- member {k}: `{m['path']}`, sha256 `{m['sha256']}`" for k, m in enumerate(card["source"]["member_files"])],
        "",
        "## Model",
        "",
        (f"- {model['arch']} with a {model['encoder']} encoder (segmentation-models-pytorch), {model['in_channels']} input "
         f"channel(s), one logit per pixel, trained at {model['resize_px']} x {model['resize_px']} px."),
        (f"- Ensemble of {members} members (one retrain seed each): {model['ensemble']}." if members > 1 else
         "- One model (no ensemble); the graph has the same form as an ensemble's."),
        f"- Flip test-time augmentation in the graph: {'yes' if onnx['flip_tta_in_graph'] else 'no'}.",
        "",
        "## Input: how to prepare an image",
        "",
        f"Input `{ONNX_INPUT}`: {onnx['input'][ONNX_INPUT]}.",
        "",
        f"1. Decode: {pre['decode']}.",
        f"2. Channels: {pre['channels']}.",
        f"3. Resize: {pre['resize']}.",
        f"4. Scale: {pre['scale']}.",
        f"5. Layout: {pre['layout']}.",
        "",
        f"Sizes: {pre['sizes']}.",
        "",
        "## Output: from the graph to a mask",
        "",
        *[f"- `{name}`: {onnx['outputs'][name]}." for name in ONNX_OUTPUTS],
        f"- Native size: {onnx['outputs']['native_size']}",
        f"- Post-processing ({pp['chosen_on']}): **{pp['describe']}**; {onnx['outputs']['post_processing']}.",
        "",
        "`python -m tumorseg.predict model.onnx IMAGES_OR_FOLDERS --out DIR` does all of this.",
        "",
        (f"Checked at export: onnxruntime vs torch (fp32) on {onnx['parity']['what'].split(',')[0]} of shapes "
         f"{', '.join('x'.join(map(str, s)) for s in onnx['parity']['inputs'])}: max |probability difference| "
         f"{onnx['parity']['max_abs_diff']['probability']:.1e}, max |logit difference| {onnx['parity']['max_abs_diff']['logits']:.1e}."),
        "",
        "## Data",
        "",
    ]
    if data:
        sizes = ", ".join(f"{k} {v}" for k, v in (data.get("split_sizes") or {}).items())
        lines += [(f"- {data.get('name', '?')} ({data.get('layout', '?')} layout, {data.get('channels', '?')} channel(s)) "
                   f"at `{data.get('path', '?')}`"),
                  (f"- fingerprint `{data.get('fingerprint', '?')}`; splits: {sizes or '?'} images "
                   f"(splits from: {data.get('splits_from', '?')})")]
    else:
        lines += ["Not recorded with this model."]
    lines += ["", "## Test metrics", ""]
    if card["metrics_file"]:
        lines += [f"From `{card['metrics_file']}` (copied whole into model_card.json). {card['evaluation_precision']}.", ""]
    lines += metrics_table(card["metrics"])
    lines += ["", "## Configuration", "", "```json", json.dumps(card["config"], indent=2), "```", "",
              "## Package versions", "", ", ".join(f"{k} {v}" for k, v in card["versions"].items()), ""]
    return "\n".join(lines)
