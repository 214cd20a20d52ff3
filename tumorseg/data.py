"""Kaggle-layout COCO data: read, rasterise, cache.

A dataset folder holds one sub-folder per split (``train``, ``valid``, ``test``), each with its
JPEGs and ``_annotations.coco.json``. Every annotation is foreground (categories are merged); an
image without annotations has an empty mask.

Masks are rasterised **from the polygon coordinates at the target resolution** with the
pixel-centre rule: pixel ``(row, col)`` is foreground when its centre ``(col + 0.5, row + 0.5)``,
in target-pixel units, lies inside a scaled polygon (even-odd rule, left/top edges inclusive,
right/bottom exclusive, so a box ``[x0, x1) x [y0, y1)`` covers exactly the pixels whose centres
it contains). Resizing a 640 px mask instead would blur or inflate the small boxes.

Each split is decoded and resized once per size, then kept in an on-disk cache of ``.npy`` files
keyed by (split fingerprint, split, size) and opened memory-mapped, so later runs and trials never
decode a JPEG. Validation and test also keep their masks at native resolution (bit-packed), since
metrics are computed there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tumorseg.errors import DataError

ANNOTATIONS = "_annotations.coco.json"
SPLITS = ("train", "valid", "test")
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes


# ----------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class ImageRecord:
    file_name: str
    height: int
    width: int
    polygons: tuple[tuple[float, ...], ...]  # flat [x0, y0, x1, y1, ...] in native pixels


def read_split(split_dir: Path) -> list[ImageRecord]:
    """Parse ``split_dir/_annotations.coco.json`` into one record per image (in JSON order)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir}")
    path = split_dir / ANNOTATIONS
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        coco = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")
    annotations = coco.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{path}: not a COCO file ('annotations' is not a list)")
    if not coco["images"]:
        raise DataError(f"{path}: the split has zero images")

    images: dict[int, dict] = {}
    for i, image in enumerate(coco["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict):
            raise DataError(f"{where} is not an object")
        for key, kind in (("id", int), ("file_name", str), ("height", int), ("width", int)):
            if not isinstance(image.get(key), kind) or isinstance(image.get(key), bool):
                raise DataError(f"{where}: missing or invalid {key!r}")
        if image["height"] <= 0 or image["width"] <= 0:
            raise DataError(f"{where}: non-positive size {image['width']}x{image['height']}")
        if image["id"] in images:
            raise DataError(f"{where}: duplicate image id {image['id']}")
        if Path(image["file_name"]).name != image["file_name"]:
            raise DataError(f"{where}: file_name must be a plain file name, got {image['file_name']!r}")
        images[image["id"]] = image

    polygons: dict[int, list[tuple[float, ...]]] = {image_id: [] for image_id in images}
    clipped = 0
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where} is not an object")
        image_id = ann.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id not in images:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        if not isinstance(ann.get("category_id"), int) or isinstance(ann.get("category_id"), bool):
            raise DataError(f"{where}: missing or invalid 'category_id'")
        image = images[ann["image_id"]]
        segmentation = ann.get("segmentation")
        if not isinstance(segmentation, list) or not segmentation:
            raise DataError(f"{where}: empty or non-polygon 'segmentation' (RLE is not supported)")
        for polygon in segmentation:
            polygon = _check_polygon(polygon, where)
            inside = _clip_polygon(polygon, image["width"], image["height"])
            clipped += inside != polygon
            polygons[ann["image_id"]].append(inside)
    if clipped:
        warnings.warn(f"{path}: {clipped} polygon(s) extend outside their image; clipped to the image", stacklevel=2)
    return [
        ImageRecord(image["file_name"], image["height"], image["width"], tuple(polygons[image["id"]]))
        for image in coco["images"]
    ]


def _check_polygon(polygon, where: str) -> tuple[float, ...]:
    if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
        raise DataError(f"{where}: a polygon needs at least 3 (x, y) points")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon):
        raise DataError(f"{where}: polygon coordinates must be finite numbers")
    xs, ys = np.asarray(polygon[0::2], float), np.asarray(polygon[1::2], float)
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    if area <= 0:
        raise DataError(f"{where}: degenerate polygon (zero area)")
    return tuple(float(v) for v in polygon)


def _clip_polygon(polygon: tuple[float, ...], width: int, height: int) -> tuple[float, ...]:
    """Clamp vertices into the image. Exact for the axis-aligned boxes of this dataset."""
    clipped = []
    for x, y in zip(polygon[0::2], polygon[1::2]):
        clipped += [min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))]
    return tuple(clipped)


# ----------------------------------------------------------------------------- rasterisation


def rasterize(polygons, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Rasterise native-pixel ``polygons`` into a ``dst_hw`` uint8 {0,1} mask (pixel-centre rule).

    Coordinates are scaled by ``dst / src`` per axis; a pixel is foreground when its centre lies
    inside any polygon (even-odd rule per polygon, union over polygons).
    """
    (src_h, src_w), (dst_h, dst_w) = src_hw, dst_hw
    mask = np.zeros((dst_h, dst_w), np.uint8)
    for polygon in polygons:
        xs = np.asarray(polygon[0::2], np.float64) * (dst_w / src_w)
        ys = np.asarray(polygon[1::2], np.float64) * (dst_h / src_h)
        # only pixels whose centres fall in the polygon's bounding box can be inside
        c0, c1 = max(0, math.floor(xs.min() - 0.5)), min(dst_w, math.ceil(xs.max() + 0.5))
        r0, r1 = max(0, math.floor(ys.min() - 0.5)), min(dst_h, math.ceil(ys.max() + 0.5))
        if c0 >= c1 or r0 >= r1:
            continue
        cx = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
        cy = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        inside = np.zeros((r1 - r0, c1 - c0), bool)
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(np.roll(xs, -1), np.roll(ys, -1))):
            if y0 == y1:
                continue  # horizontal edges never cross a horizontal ray
            crosses = (y0 > cy) != (y1 > cy)  # (rows, 1): the edge spans this row's centre
            x_at = x0 + (cy - y0) * (x1 - x0) / (y1 - y0)  # where the edge meets the row
            inside ^= crosses & (cx < x_at)
        mask[r0:r1, c0:c1] |= inside
    return mask


# ----------------------------------------------------------------------------- decoding


def decode_gray(path: Path, size_px: int | None, expected_hw: tuple[int, int]) -> np.ndarray:
    """Decode a JPEG/PNG to 1-channel uint8, resized to ``size_px`` square (None: native)."""
    try:
        with Image.open(path) as image:
            if (image.height, image.width) != tuple(expected_hw):
                raise DataError(
                    f"{path}: image is {image.width}x{image.height} but the annotations say "
                    f"{expected_hw[1]}x{expected_hw[0]}"
                )
            if size_px is not None and image.format == "JPEG":
                image.draft("L", (size_px, size_px))  # DCT-domain downscale: decodes 2-8x faster
            gray = image.convert("L")
            if size_px is not None and gray.size != (size_px, size_px):
                gray = gray.resize((size_px, size_px), Image.Resampling.BILINEAR)
            return np.asarray(gray, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image listed in {ANNOTATIONS} but missing: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable or truncated image ({err})") from None


# ----------------------------------------------------------------------------- cached splits


@dataclass
class Split:
    """One split at one training size, as arrays (memory-mapped from the cache when loaded)."""

    name: str
    images: np.ndarray  # (N, S, S) uint8, grey
    masks: np.ndarray  # (N, S, S) uint8 {0, 1}, rasterised at S
    native_masks: np.ndarray | None  # (N, H, ceil(W / 8)) uint8, bit-packed masks at native H x W
    native_hw: tuple[int, int]
    file_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size_px(self) -> int:
        return int(self.images.shape[-1])

    def native_mask(self, index) -> np.ndarray:
        """Unpacked native-resolution mask(s) for an index or slice, uint8 {0, 1}."""
        if self.native_masks is None:
            raise ValueError(f"split {self.name!r} was loaded without native masks")
        return np.unpackbits(self.native_masks[index], axis=-1, count=self.native_hw[1])


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUMORSEG_CACHE_DIR", Path.home() / ".cache" / "tumorseg"))


def split_fingerprint(split_dir: Path, records: list[ImageRecord]) -> str:
    """Hash of the annotation file and the listed images' names and sizes.

    Cheap (no image is read) and stable when the dataset is copied elsewhere.
    """
    split_dir = Path(split_dir)
    digest = hashlib.sha256(f"tumorseg-cache-v{CACHE_VERSION}".encode())
    digest.update((split_dir / ANNOTATIONS).read_bytes())
    for record in records:
        path = split_dir / record.file_name
        try:
            digest.update(f"{record.file_name}:{path.stat().st_size}".encode())
        except FileNotFoundError:
            raise DataError(f"image listed in {ANNOTATIONS} but missing: {path}") from None
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read ({err})") from None
    return digest.hexdigest()[:16]


def load_split(
    data_dir: Path,
    split: str,
    size_px: int,
    *,
    native: bool = False,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> Split:
    """Arrays of ``data_dir/split`` at ``size_px``, built once and then memory-mapped from cache.

    ``native=True`` also loads the bit-packed masks at native resolution (for metrics).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise DataError(f"split folder missing: {split_dir} (expected {', '.join(SPLITS)} under {data_dir})")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    records = read_split(split_dir)  # parsed once: it validates, fingerprints and builds
    root = cache_dir / f"{split}-{split_fingerprint(split_dir, records)}"

    def entry(name: str, build) -> Path:
        target = root / name
        if not (target / "done").is_file():
            _build_atomically(target, build)
        return target

    sized = entry(f"{size_px}px", lambda tmp: _build_sized(split_dir, records, size_px, tmp, workers))
    meta = json.loads((sized / "meta.json").read_text())
    native_masks = None
    if native:
        native_dir = entry("native", lambda tmp: _build_native(split_dir, records, tmp))
        native_masks = np.load(native_dir / "masks_packed.npy", mmap_mode="r")
    return Split(
        name=split,
        images=np.load(sized / "images.npy", mmap_mode="r"),
        masks=np.load(sized / "masks.npy", mmap_mode="r"),
        native_masks=native_masks,
        native_hw=tuple(meta["native_hw"]),
        file_names=tuple(meta["file_names"]),
    )


def _build_atomically(target: Path, build) -> None:
    """Build into a temp folder beside ``target`` and rename it into place (safe under races)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "done").touch()
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "done").is_file():  # a stale, unfinished folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            # else another process finished the same entry first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _native_hw(split_dir: Path, records: list[ImageRecord]) -> tuple[int, int]:
    sizes = {(r.height, r.width) for r in records}
    if len(sizes) != 1:
        raise DataError(
            f"{split_dir / ANNOTATIONS}: images of several sizes {sorted(sizes)[:3]}...; "
            "tumorseg needs one native size per split"
        )
    return sizes.pop()


def _build_sized(split_dir: Path, records, size_px: int, out: Path, workers: int | None) -> None:
    from tqdm.auto import tqdm

    native_hw = _native_hw(split_dir, records)
    images = np.lib.format.open_memmap(out / "images.npy", "w+", np.uint8, (len(records), size_px, size_px))
    masks = np.lib.format.open_memmap(out / "masks.npy", "w+", np.uint8, (len(records), size_px, size_px))

    def work(i: int) -> None:
        record = records[i]
        images[i] = decode_gray(split_dir / record.file_name, size_px, (record.height, record.width))
        masks[i] = rasterize(record.polygons, (record.height, record.width), (size_px, size_px))

    # PIL releases the GIL while decoding, so threads use every core without pickling arrays.
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        jobs = pool.map(work, range(len(records)))
        desc = f"caching {split_dir.name} at {size_px}px"
        for _ in tqdm(jobs, total=len(records), desc=desc, unit="img", file=sys.stderr, mininterval=1.0):
            pass
    images.flush()
    masks.flush()
    meta = {"native_hw": native_hw, "file_names": [r.file_name for r in records], "size_px": size_px}
    (out / "meta.json").write_text(json.dumps(meta))


def _build_native(split_dir: Path, records, out: Path) -> None:
    height, width = _native_hw(split_dir, records)
    packed = np.lib.format.open_memmap(
        out / "masks_packed.npy", "w+", np.uint8, (len(records), height, (width + 7) // 8)
    )
    for i, record in enumerate(records):
        packed[i] = np.packbits(rasterize(record.polygons, (height, width), (height, width)), axis=-1)
    packed.flush()


def load_dataset(
    data_dir: Path,
    size_px: int,
    splits=("train", "valid", "test"),
    cache_dir: Path | None = None,
) -> dict[str, Split]:
    """The named splits at ``size_px``; evaluation splits carry their native masks."""
    return {
        split: load_split(data_dir, split, size_px, native=split != "train", cache_dir=cache_dir)
        for split in splits
    }
