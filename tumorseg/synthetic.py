"""A small built-in dataset: head-like phantoms with a lesion, in any layout tumorseg reads.

Each image is a grey "MRI slice": an elliptical head with a bright skull rim, textured brain,
two dark ventricles and, in most images, one lesion (a bright or dark blob).

- ``coco`` (default, the exact Kaggle layout): the label is the lesion's bounding box written as
  a 5-point COCO polygon, like the real data; images without a lesion have no annotation. Images
  are RGB JPEGs with three identical channels, as in Kaggle.
- ``pairs`` (``images/X.png`` + ``masks/X.png``), ``pairs-beside`` (``CASE/X.tif`` +
  ``CASE/X_mask.tif``, the LGG convention) and ``nnunet`` (``imagesTr/CASE_000c.png``,
  ``labelsTr``, ``imagesTs``/``labelsTs`` for the test images, ``dataset.json``): the label is
  the lesion's own outline. Images come in cases of ``slices_per_case`` slices (``caseK_J``);
  pairs are unsplit unless ``presplit``. ``channels`` > 1 adds contrast variants as channels;
  ``bit_depth`` 16 writes 12-bit-range intensities in 16-bit files.

Deterministic by seed: the same arguments always write the same files. Every layout carries a
``.tumorseg-synthetic`` marker, so results on it are labelled "built-in synthetic".

    python -m tumorseg.synthetic OUT_DIR [--layout coco] [--image-px 256] [--n-train 128] [--seed 0]
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

from tumorseg.data import ANNOTATIONS, SYNTHETIC_MARKER, default_cache_dir

LAYOUTS = ("coco", "pairs", "pairs-beside", "nnunet")

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
    layout: str = "coco"
    channels: int = 1  # not coco
    bit_depth: int = 8  # 8 or 16; not coco
    slices_per_case: int = 4  # not coco
    presplit: bool = False  # pairs layouts: write train/valid/test folders

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "coco" and (self.channels != 1 or self.bit_depth != 8):
            raise ValueError("the coco layout is 8-bit grey JPEG (as in Kaggle)")
        if self.layout.startswith("pairs") and self.channels not in (1, 3, 4):
            raise ValueError("pairs layouts write 1, 3 or 4 channels per file (nnunet: any number)")

    @property
    def folder_name(self) -> str:
        name = f"synthetic-s{self.seed}-{self.image_px}px-{self.n_train}-{self.n_valid}-{self.n_test}-e{self.empty_fraction:g}"
        if self.layout != "coco":
            name += f"-{self.layout}-c{self.channels}-b{self.bit_depth}-k{self.slices_per_case}{'-split' if self.presplit else ''}"
        return name


def phantom(rng: np.random.Generator, size: int, with_lesion: bool):
    """One grey uint8 phantom and its lesion box ``(x0, y0, x1, y1)`` in pixels (or None)."""
    image, box, _ = phantom_float(rng, size, with_lesion)
    return (image * 255).astype(np.uint8), box


def phantom_float(rng: np.random.Generator, size: int, with_lesion: bool):
    """``(image in [0, 1], lesion box or None, lesion mask bool (H, W))``."""
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

    box, lesion = None, np.zeros((size, size), bool)
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
    return np.clip(image, 0, 1), box, lesion


def make_synthetic(out_dir: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset for ``spec`` into ``out_dir`` (created); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SYNTHETIC_MARKER).write_text(json.dumps(asdict(spec)) + "\n")
    if spec.layout != "coco":
        return _make_raster(out_dir, spec)
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


# ----------------------------------------------------------------------------- raster layouts


def _channels(image: np.ndarray, count: int) -> list[np.ndarray]:
    """Channel 0 is the phantom; channel c > 0 a gamma variant (a different "sequence")."""
    return [image] + [image ** (1 + 0.6 * c) for c in range(1, count)]


def _quantise(image: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 8:
        return (image * 255).astype(np.uint8)
    return (200 + image * 3000).astype(np.uint16)  # a 12-bit scanner range in a 16-bit file


def _write_image(path: Path, bands: list[np.ndarray]) -> Path:
    """PNG/TIFF via PIL where it can (1 band, or 3 bands of 8 bits), else a TIFF via OpenCV."""
    if len(bands) == 1:
        Image.fromarray(bands[0]).save(path)
        return path
    stacked = np.stack(bands, -1)
    if len(bands) == 3 and stacked.dtype == np.uint8:
        Image.fromarray(stacked).save(path)
        return path
    import cv2

    path = path.with_suffix(".tif")
    if len(bands) in (3, 4):
        stacked = stacked[..., [2, 1, 0, 3][: len(bands)]]  # OpenCV writes BGR(A)
    if not cv2.imwrite(str(path), stacked):
        raise OSError(f"cannot write {path}")
    return path


def _make_raster(out_dir: Path, spec: SyntheticSpec) -> Path:
    counts = {"train": spec.n_train, "valid": spec.n_valid, "test": spec.n_test}
    pool_index = 0
    for offset, (split, count) in enumerate(counts.items()):
        for i in range(count):
            rng = np.random.default_rng([spec.seed, offset, i])
            image, _, lesion = phantom_float(rng, spec.image_px, with_lesion=rng.uniform() >= spec.empty_fraction)
            bands = [_quantise(c, spec.bit_depth) for c in _channels(image, spec.channels)]
            k = i if spec.presplit or spec.layout == "nnunet" else pool_index  # cases never span splits
            stem = f"case{offset}{k // spec.slices_per_case:03d}_{k % spec.slices_per_case}"
            pool_index += 1
            _write_sample(out_dir, spec, split, stem, bands, lesion)
    if spec.layout == "nnunet":
        meta = {
            "channel_names": {str(c): f"seq{c}" for c in range(spec.channels)},
            "labels": {"background": 0, "tumour": 1},
            "numTraining": spec.n_train + spec.n_valid,
            "file_ending": ".png",
        }
        (out_dir / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out_dir


def _write_sample(out_dir: Path, spec: SyntheticSpec, split: str, stem: str, bands, lesion) -> None:
    if spec.layout == "nnunet":
        suffix = "Ts" if split == "test" else "Tr"
        (out_dir / f"images{suffix}").mkdir(exist_ok=True)
        (out_dir / f"labels{suffix}").mkdir(exist_ok=True)
        for c, band in enumerate(bands):
            Image.fromarray(band).save(out_dir / f"images{suffix}" / f"{stem}_{c:04d}.png")
        Image.fromarray(lesion.astype(np.uint8)).save(out_dir / f"labels{suffix}" / f"{stem}.png")
        return
    base = out_dir / split if spec.presplit else out_dir
    mask = Image.fromarray(lesion.astype(np.uint8) * 255)
    if spec.layout == "pairs":
        (base / "images").mkdir(parents=True, exist_ok=True)
        (base / "masks").mkdir(parents=True, exist_ok=True)
        _write_image(base / "images" / f"{stem}.png", bands)
        mask.save(base / "masks" / f"{stem}.png")
    else:  # pairs-beside: CASE/X.tif + CASE/X_mask.tif
        folder = base / stem.rsplit("_", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        _write_image(folder / f"{stem}.tif", bands)
        mask.save(folder / f"{stem}_mask.tif")


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
    if not (target / SYNTHETIC_MARKER).is_file():  # written by a version before the marker existed
        (target / SYNTHETIC_MARKER).write_text(json.dumps(asdict(spec)) + "\n")
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
    parser.add_argument("--layout", choices=LAYOUTS, default=defaults.layout)
    parser.add_argument("--channels", type=int, default=defaults.channels)
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=defaults.bit_depth)
    parser.add_argument("--slices-per-case", type=int, default=defaults.slices_per_case)
    parser.add_argument("--presplit", action="store_true", help="pairs layouts: write train/valid/test folders")
    args = parser.parse_args(argv)
    for flag in ("image_px", "n_train", "n_valid", "n_test", "channels", "slices_per_case"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    try:
        spec = SyntheticSpec(args.image_px, args.n_train, args.n_valid, args.n_test, args.seed, layout=args.layout,
                             channels=args.channels, bit_depth=args.bit_depth,
                             slices_per_case=args.slices_per_case, presplit=args.presplit)
    except ValueError as err:
        parser.error(str(err))
    print(make_synthetic(args.out_dir, spec))


if __name__ == "__main__":
    main()
