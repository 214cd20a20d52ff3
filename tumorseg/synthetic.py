"""A small built-in dataset in the exact Kaggle layout: head-like phantoms with a boxed lesion.

Each image is a grey "MRI slice": an elliptical head with a bright skull rim, textured brain,
two dark ventricles and, in most images, one lesion (a bright or dark blob). Its label is the
lesion's bounding box written as a 5-point COCO polygon, like the real data; a few images have no
lesion and so no annotation. Images are RGB JPEGs with three identical channels, as in Kaggle.

Deterministic by seed: the same arguments always write the same files.

    python -m tumorseg.synthetic OUT_DIR [--image-px 256] [--n-train 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tumorseg.data import ANNOTATIONS, default_cache_dir

CATEGORIES = [
    {"id": 0, "name": "Tumor", "supercategory": "none"},
    {"id": 1, "name": "0", "supercategory": "Tumor"},
    {"id": 2, "name": "1", "supercategory": "Tumor"},
]


@dataclass(frozen=True)
class SyntheticSpec:
    image_px: int = 256
    n_train: int = 128
    n_valid: int = 32
    n_test: int = 32
    seed: int = 0
    empty_fraction: float = 0.05  # images without a lesion

    @property
    def folder_name(self) -> str:
        return (
            f"synthetic-s{self.seed}-{self.image_px}px-"
            f"{self.n_train}-{self.n_valid}-{self.n_test}-e{self.empty_fraction:g}"
        )


def phantom(rng: np.random.Generator, size: int, with_lesion: bool):
    """One grey uint8 phantom and its lesion box ``(x0, y0, x1, y1)`` in pixels (or None)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = size * rng.uniform(0.45, 0.55), size * rng.uniform(0.45, 0.55)
    ax, ay = size * rng.uniform(0.32, 0.40), size * rng.uniform(0.38, 0.45)
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)

    image = np.zeros((size, size), np.float32)
    brain = r < 0.92
    # smooth texture: low-frequency noise upsampled
    coarse = rng.normal(0.0, 1.0, (8, 8)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    image[brain] = 0.42 + 0.05 * texture[brain]
    image[(r >= 0.92) & (r < 1.0)] = 0.85  # skull rim
    for side in (-1, 1):  # ventricles
        vx, vy = cx + side * ax * 0.18, cy - ay * 0.05
        v = ((xx - vx) / (ax * 0.10)) ** 2 + ((yy - vy) / (ay * 0.25)) ** 2 < 1
        image[v] = 0.15

    box = None
    if with_lesion:
        for _ in range(100):  # place the lesion inside the brain
            lr_x, lr_y = size * rng.uniform(0.04, 0.12), size * rng.uniform(0.04, 0.12)
            angle = rng.uniform(0, np.pi)
            lx, ly = rng.uniform(cx - 0.6 * ax, cx + 0.6 * ax), rng.uniform(cy - 0.6 * ay, cy + 0.6 * ay)
            if np.hypot((lx - cx) / ax, (ly - cy) / ay) + max(lr_x, lr_y) / min(ax, ay) < 0.85:
                break
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - lx) * c + (yy - ly) * s, -(xx - lx) * s + (yy - ly) * c
        lesion = (u / lr_x) ** 2 + (v / lr_y) ** 2 < 1
        image[lesion] = rng.choice([0.80, 0.25]) + 0.04 * texture[lesion]
        rows, cols = np.nonzero(lesion)
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))

    image += rng.normal(0.0, 0.03, image.shape).astype(np.float32)  # scanner noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), box


def make_synthetic(out_dir: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write ``out_dir/{train,valid,test}`` in the Kaggle layout; returns ``out_dir``."""
    out_dir = Path(out_dir)
    counts = {"train": spec.n_train, "valid": spec.n_valid, "test": spec.n_test}
    for offset, (split, count) in enumerate(counts.items()):
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            # one generator per image: adding images to a split never changes the others
            rng = np.random.default_rng([spec.seed, offset, i])
            gray, box = phantom(rng, spec.image_px, with_lesion=rng.uniform() >= spec.empty_fraction)
            file_name = f"phantom_{split}_{i:04d}.jpg"
            Image.fromarray(gray).convert("RGB").save(split_dir / file_name, quality=95)
            images.append({"id": i, "file_name": file_name, "height": spec.image_px, "width": spec.image_px})
            if box is not None:
                x0, y0, x1, y1 = box
                annotations.append({
                    "id": len(annotations),
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "segmentation": [[x1, y0, x0, y0, x0, y1, x1, y1, x1, y0]],
                    "iscrowd": 0,
                })
        coco = {
            "info": {"description": f"tumorseg synthetic phantoms {asdict(spec)}"},
            "categories": CATEGORIES,
            "images": images,
            "annotations": annotations,
        }
        (split_dir / ANNOTATIONS).write_text(json.dumps(coco))
    return out_dir


def ensure_synthetic(spec: SyntheticSpec = SyntheticSpec(), root: Path | None = None) -> Path:
    """The synthetic dataset for ``spec`` under the cache folder, written on first use."""
    root = Path(root) if root is not None else default_cache_dir()
    target = root / spec.folder_name
    if not (target / "done").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
        make_synthetic(tmp, spec)
        (tmp / "done").touch()
        try:
            tmp.rename(target)
        except OSError:  # written meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    defaults = SyntheticSpec()
    parser.add_argument("--image-px", type=int, default=defaults.image_px)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-valid", type=int, default=defaults.n_valid)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    for flag in ("image_px", "n_train", "n_valid", "n_test"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    spec = SyntheticSpec(args.image_px, args.n_train, args.n_valid, args.n_test, args.seed)
    print(make_synthetic(args.out_dir, spec))


if __name__ == "__main__":
    main()
