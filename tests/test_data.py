import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tumorseg import data as data_mod
from tumorseg.data import DataError, load_split, rasterize, read_split


def box(x0, y0, x1, y1):
    return (x1, y0, x0, y0, x0, y1, x1, y1, x1, y0)  # Roboflow's 5-point order


# ----------------------------------------------------------------------------- rasterisation


def test_box_uses_pixel_centre_rule_half_open():
    # centres 1.5, 2.5, 3.5 lie in [1.5, 4.0); 4.5 does not; rows: centres 0.5 and 1.5 lie in [0.2, 2.0)
    mask = rasterize([box(1.5, 0.2, 4.0, 2.0)], (8, 8), (8, 8))
    expected = np.zeros((8, 8), np.uint8)
    expected[0:2, 1:4] = 1
    np.testing.assert_array_equal(mask, expected)


def test_box_is_scaled_to_target_before_rasterising():
    # a 640-px box [160, 480) x [320, 352) at 64 px is [16, 48) x [32, 35.2): rows 32..34, cols 16..47
    mask = rasterize([box(160, 320, 480, 352)], (640, 640), (64, 64))
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32, 34, 16, 47)
    assert mask.sum() == 3 * 32


def test_triangle_pixel_exact():
    # right triangle (0,0) (4,0) (0,4): centre (c+.5, r+.5) inside iff c + r + 1 < 4
    mask = rasterize([(0, 0, 4, 0, 0, 4)], (4, 4), (4, 4))
    expected = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(mask, expected)


def test_non_square_scaling_and_union():
    mask = rasterize([box(0, 0, 2, 2), box(6, 2, 8, 4)], (4, 8), (2, 4))  # halve both axes
    expected = np.zeros((2, 4), np.uint8)
    expected[0, 0] = 1
    expected[1, 3] = 1
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------- real dev data


def test_dev_two_box_image_rasterises_both_boxes(dev_data):
    records = {r.file_name.split("_jpg")[0]: r for r in read_split(dev_data / "train")}
    two = records["176"]
    assert len(two.polygons) == 2
    big = rasterize(two.polygons[:1], (640, 640), (640, 640))
    small = rasterize(two.polygons[1:], (640, 640), (640, 640))
    # big box x [373.75, 475) y [221.25, 327.5): centres 374.5..474.5 x 221.5..326.5 -> 101 x 106
    assert big.sum() == 101 * 106
    # small box x [471.25, 473.75) y [326.25, 333.75): cols 471..473, rows 326..333 -> 3 x 8
    rows, cols = np.nonzero(small)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (326, 333, 471, 473)
    both = rasterize(two.polygons, (640, 640), (640, 640))
    assert both.sum() == big.sum() + small.sum() - (big & small).sum()


def test_dev_image_without_annotation_has_empty_mask(dev_data, tmp_path):
    records = read_split(dev_data / "train")
    empty = [i for i, r in enumerate(records) if not r.polygons]
    assert [records[i].file_name.split("_jpg")[0] for i in empty] == ["2369"]
    split = load_split(dev_data, "train", 64, cache_dir=tmp_path)
    assert split.masks[empty[0]].sum() == 0
    assert split.images.dtype == np.uint8 and split.images.shape == (len(records), 64, 64)


# ----------------------------------------------------------------------------- cache


def test_cache_second_load_decodes_nothing(synthetic_dir, tmp_path, monkeypatch):
    first = load_split(synthetic_dir, "valid", 64, native=True, cache_dir=tmp_path)
    assert any(tmp_path.iterdir())  # built into the cache (its progress bar shows only on a terminal)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached split was decoded again")

    monkeypatch.setattr(data_mod, "decode_gray", no_decoding)
    second = load_split(synthetic_dir, "valid", 64, native=True, cache_dir=tmp_path)
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.native_mask(slice(None)), second.native_mask(slice(None)))
    assert second.native_hw == (96, 96)


def test_cache_keyed_by_content(synthetic_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_dir, copy)
    a = load_split(copy, "valid", 64, cache_dir=tmp_path / "cache")
    coco = json.loads((copy / "valid" / "_annotations.coco.json").read_text())
    coco["annotations"] = []  # different labels: a different cache entry
    (copy / "valid" / "_annotations.coco.json").write_text(json.dumps(coco))
    b = load_split(copy, "valid", 64, cache_dir=tmp_path / "cache")
    assert a.masks.sum() > 0 and b.masks.sum() == 0


def test_native_masks_match_polygons(synthetic_dir, tmp_path):
    split = load_split(synthetic_dir, "test", 64, native=True, cache_dir=tmp_path)
    records = read_split(synthetic_dir / "test")
    for i in (0, 5):
        expected = rasterize(records[i].polygons, (96, 96), (96, 96))
        np.testing.assert_array_equal(split.native_mask(i), expected)


# ----------------------------------------------------------------------------- bad input


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(root: Path, edit) -> Path:
    path = root / "train" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return path


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        load_split(tmp_path / "nowhere", "train", 64, cache_dir=tmp_path)
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="split folder missing: .*ds/train"):
        load_split(tmp_path / "ds", "train", 64, cache_dir=tmp_path)


def test_missing_and_malformed_json(synthetic_dir, tmp_path):
    root = _broken_copy(synthetic_dir, tmp_path / "ds")
    ann = root / "train" / "_annotations.coco.json"
    ann.write_text("{not json")
    with pytest.raises(DataError, match=r"_annotations\.coco\.json: not valid JSON"):
        load_split(root, "train", 64, cache_dir=tmp_path)
    ann.write_text('{"hello": 1}')
    with pytest.raises(DataError, match="not a COCO file"):
        load_split(root, "train", 64, cache_dir=tmp_path)
    ann.unlink()
    with pytest.raises(DataError, match="annotation file not found: .*train/_annotations.coco.json"):
        load_split(root, "train", 64, cache_dir=tmp_path)


def test_listed_image_missing(synthetic_dir, tmp_path):
    root = _broken_copy(synthetic_dir, tmp_path / "ds")
    (root / "train" / "phantom_train_0003.jpg").unlink()
    with pytest.raises(DataError, match="listed .* but missing: .*phantom_train_0003.jpg"):
        load_split(root, "train", 64, cache_dir=tmp_path)


def test_unreadable_and_truncated_image(synthetic_dir, tmp_path):
    root = _broken_copy(synthetic_dir, tmp_path / "ds")
    target = root / "train" / "phantom_train_0007.jpg"
    target.write_bytes(target.read_bytes()[:400])
    with pytest.raises(DataError, match="phantom_train_0007.jpg: unreadable or truncated"):
        load_split(root, "train", 64, cache_dir=tmp_path / "c1")
    target.write_bytes(b"this is no jpeg")
    with pytest.raises(DataError, match="phantom_train_0007.jpg: unreadable or truncated"):
        load_split(root, "train", 64, cache_dir=tmp_path / "c2")


def test_polygon_outside_image_is_clipped_with_warning(synthetic_dir, tmp_path):
    root = _broken_copy(synthetic_dir, tmp_path / "ds")

    def push_out(coco):
        coco["annotations"][0]["segmentation"] = [list(box(80, 80, 120, 110))]  # image is 96 px

    _edit_json(root, push_out)
    with pytest.warns(UserWarning, match="1 polygon.* outside .* clipped"):
        records = read_split(root / "train")
    image_index = next(i for i, r in enumerate(records) if r.polygons and max(r.polygons[0]) == 96)
    mask = rasterize(records[image_index].polygons, (96, 96), (96, 96))
    assert mask.sum() == 16 * 16 and mask[80:96, 80:96].all()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(images=[]), "zero images"),
        (lambda c: c["annotations"][0].update(segmentation=[]), r"annotations\[0\]: empty"),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 1, 5, 5, 9, 9]]), "degenerate polygon"),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 1, 5]]), "at least 3"),
        (lambda c: c["annotations"][0].pop("category_id"), "category_id"),
        (lambda c: c["annotations"][0].update(image_id=99999), "image_id 99999"),
        (lambda c: c["images"][0].pop("file_name"), r"images\[0\]: missing or invalid 'file_name'"),
    ],
)
def test_bad_annotations_name_the_file(synthetic_dir, tmp_path, edit, message):
    root = _broken_copy(synthetic_dir, tmp_path / "ds")
    _edit_json(root, edit)
    with pytest.raises(DataError, match=message) as info:
        read_split(root / "train")
    assert "train/_annotations.coco.json" in str(info.value)
