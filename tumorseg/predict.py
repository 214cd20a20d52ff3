"""Predict tumour masks for image files and folders with the model you take home.

    python -m tumorseg.predict SOURCE INPUT [INPUT ...] --out DIR [--batch-size N] [--probabilities]

SOURCE is a ``search.run`` folder (its final ensemble and the post-processing chosen on validation),
a ``model.pt`` (``tumorseg.train``; its configuration's threshold) or a ``model.onnx``
(``tumorseg.export``; run by onnxruntime on the CPU). INPUT is an image file or a folder, searched
recursively for the image files tumorseg reads (``tumorseg.imageio.IMAGE_SUFFIXES``; the ``--out``
folder is skipped). Under DIR, at each image's path relative to its INPUT folder (a file INPUT: its
name), without the suffix:

- ``<name>_mask.png``: the mask at the image's native resolution, 0/255;
- ``<name>_overlay.png``: the predicted outline in red over the image (its first channel);
- ``<name>_prob.png`` with ``--probabilities``: the probability map at native resolution, a 16-bit
  grey PNG holding ``round(p * 65535)`` (finer than float16 near the threshold, and any viewer opens it);
- ``predictions.csv``, one row per image in order: ``file`` (as found), ``mask`` (relative to DIR),
  ``tumour_px``, ``tumour_fraction`` (of the image's pixels), ``max_probability``.

A mask is what validation and test scored: the same probabilities (``tumorseg.shipped``: logits
upsampled to the native size, sigmoid, mean over members and flips), the same threshold and
post-processing. Images are decoded and resized as in training, in batches of ``--batch-size``. Model
files are read with ``weights_only=True``: nothing in them is ever executed.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.errors import UserError
from tumorseg.imageio import (
    IMAGE_SUFFIXES,
    decode_for_model,
    is_image_file,
    read_header,
)
from tumorseg.shipped import Shipped, open_shipped, probabilities
from tumorseg.visualize import overlay

CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("file", "mask", "tumour_px", "tumour_fraction", "max_probability")
PROBABILITY_SCALE = 65535  # the 16-bit probability PNG holds round(p * 65535)


@dataclass(frozen=True)
class InputImage:
    path: Path  # as found (the INPUT joined with the path below it)
    name: Path  # the output name: relative to its INPUT folder, without the suffix
    native_hw: tuple[int, int]


def find_images(inputs: list[Path], out: Path) -> list[InputImage]:
    """Every image of ``inputs`` (files, folders searched recursively, skipping ``out``), with its
    header read: an unreadable file, an empty folder or two images with one output name is an error."""
    skip = Path(out).resolve()
    found: dict[Path, Path] = {}
    for given in map(Path, inputs):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and is_image_file(p) and not p.resolve().is_relative_to(skip))
            if not files:
                raise UserError(f"{given}: no images ({' '.join(IMAGE_SUFFIXES)}) in this folder or below")
            pairs = [(p, p.relative_to(given).with_suffix("")) for p in files]
        elif given.is_file():
            pairs = [(given, Path(given.stem))]
        else:
            raise UserError(f"input not found: {given}")
        for path, name in pairs:
            if name in found:
                raise UserError(f"{found[name]} and {path} would both write {Path(out) / name}_mask.png; "
                                "predict them into separate --out folders")
            found[name] = path
    return [InputImage(path, name, read_header(path).hw) for name, path in found.items()]


def predict_images(shipped: Shipped, images: list[InputImage]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(probabilities, mask)`` at native size for each image, decoded as in training."""
    from tumorseg.postprocess import apply_postprocess

    small = np.stack([decode_for_model(i.path, shipped.cfg.resize_px, shipped.in_channels) for i in images])
    probs = probabilities(shipped, small, [i.native_hw for i in images])
    return [(p, apply_postprocess(p[None], shipped.postprocess)[0]) for p in probs]


def predict_file(model, cfg, path: Path) -> np.ndarray:
    """The {0,1} mask of one image file by one model at the image's native resolution (its
    configuration's threshold; the same path as ``tumorseg.predict`` with a model.pt)."""
    from tumorseg.checkpoint import in_channels
    from tumorseg.postprocess import PostProcess

    shipped = Shipped("model", Path(path), cfg, PostProcess(threshold=cfg.threshold), in_channels(model), models=[model])
    image = InputImage(Path(path), Path(Path(path).stem), read_header(path).hw)
    return predict_images(shipped, [image])[0][1]


def write_outputs(out: Path, shipped: Shipped, image: InputImage, probs: np.ndarray, mask: np.ndarray,
                  save_probabilities: bool) -> list:
    """The image's mask, overlay (and probability) files; returns its ``predictions.csv`` row."""
    stem = out / image.name
    stem.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask * 255).save(f"{stem}_mask.png")
    native = decode_for_model(image.path, None, shipped.in_channels)
    # zlib level 1: a 640 px overlay saves in 16 ms instead of 50 (level 6) for 9 % more bytes
    overlay(native, np.zeros_like(mask), mask).save(f"{stem}_overlay.png", compress_level=1)
    if save_probabilities:
        Image.fromarray(np.round(probs * PROBABILITY_SCALE).astype(np.uint16)).save(f"{stem}_prob.png", compress_level=1)
    tumour_px = int(mask.sum())
    return [str(image.path), f"{image.name}_mask.png", tumour_px, repr(tumour_px / mask.size), f"{float(probs.max()):.6f}"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="tumorseg.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a search.run folder, a model.pt or a model.onnx")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="image files or folders (recursive)")
    p.add_argument("--out", type=Path, default=Path("results/predict"), help="output folder (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the model's eval_batch_size)")
    p.add_argument("--probabilities", action="store_true", help="also write <name>_prob.png: 16-bit, round(p * 65535)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where torch models run (auto: cuda if available); ONNX runs on the CPU (default: %(default)s)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("tumorseg.predict"):
        if args.batch_size is not None and args.batch_size < 1:
            raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here")
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
        shipped = open_shipped(args.source, device)  # errors in argument order: the source, then the images
        images = find_images(args.inputs, args.out)
        print(f"model: {shipped.describe()}")
        if args.batch_size:  # the forward passes' batch too (predict_probabilities chunks by eval_batch_size)
            shipped.cfg = shipped.cfg.replace(eval_batch_size=args.batch_size)
        batch_size = shipped.cfg.eval_batch_size
        args.out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        with open(args.out / CSV_NAME, "w", newline="") as f, \
                tqdm(total=len(images), desc="predict", unit="image", disable=None if len(images) > 1 else True) as bar:
            table = csv.writer(f)
            table.writerow(CSV_COLUMNS)
            tumour_images = 0
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                for image, (probs, mask) in zip(batch, predict_images(shipped, batch)):
                    row = write_outputs(args.out, shipped, image, probs, mask, args.probabilities)
                    table.writerow(row)
                    tumour_images += row[2] > 0
                f.flush()
                bar.update(len(batch))
        print(f"{len(images)} image(s), {tumour_images} with tumour: masks, overlays and {CSV_NAME} in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
