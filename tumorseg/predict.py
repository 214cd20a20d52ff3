"""Predict tumour masks with a trained ``model.pt``.

    python -m tumorseg.predict MODEL.pt IMAGE [IMAGE ...] --out DIR

Writes, per image, ``<name>_mask.png`` (native resolution, 0/255) and ``<name>_overlay.png``
(predicted outline in red). The model file is read with ``weights_only=True``: a file that is not
a tumorseg model is refused, and nothing in it is ever executed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.checkpoint import in_channels, load_model
from tumorseg.imageio import decode_for_model, read_header
from tumorseg.inference import predict_masks
from tumorseg.visualize import overlay


def predict_file(model, cfg, path: Path) -> np.ndarray:
    """The predicted {0,1} mask of one image file, at the image's native resolution."""
    native_hw = read_header(path).hw
    small = decode_for_model(path, cfg.resize_px, in_channels(model))  # refuses another channel count
    return predict_masks(model, small[None], cfg, native_hw)[0]  # probability > cfg.threshold


def main(argv=None) -> None:
    p = ArgumentParser(prog="tumorseg.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("results/predict"))
    args = p.parse_args(argv)
    with exit_on_user_error("tumorseg.predict"):
        model, cfg, _ = load_model(args.model)
        args.out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        images = tqdm(args.images, desc="predict", unit="image", disable=None if len(args.images) > 1 else True)
        for path in images:
            mask = predict_file(model, cfg, path)
            Image.fromarray(mask * 255).save(args.out / f"{path.stem}_mask.png")
            native = decode_for_model(path, None, in_channels(model))
            overlay(native, np.zeros_like(mask), mask).save(args.out / f"{path.stem}_overlay.png")
            images.write(f"{path}: {int(mask.sum())} tumour pixels -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
