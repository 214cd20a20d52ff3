"""The Kaggle (Roboflow) COCO layout: parse ``_annotations.coco.json`` and rasterise its polygons.

A split folder holds its images and ``_annotations.coco.json``. Every annotation is foreground
(categories are merged); an image without annotations has an empty mask.

Masks are rasterised **from the polygon coordinates at the target resolution** with the
pixel-centre rule: pixel ``(row, col)`` is foreground when its centre ``(col + 0.5, row + 0.5)``,
in target-pixel units, lies inside a scaled polygon (even-odd rule, left/top edges inclusive,
right/bottom exclusive, so a box ``[x0, x1) x [y0, y1)`` covers exactly the pixels whose centres
it contains). Resizing a 640 px mask instead would blur or inflate the small boxes.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.errors import DataError

ANNOTATIONS = "_annotations.coco.json"


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
