"""Bring your own data: every layout, channels, 16-bit, label ids, grouped splits, bad input."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from tumorseg.data import DataOptions, cross_split_duplicates, inspect, load_dataset, load_split, open_dataset
from tumorseg.errors import ConfigError, DataError
from tumorseg.imageio import to_uint8
from tumorseg.inspect_data import report_lines
from tumorseg.splits import parse_fractions
from tumorseg.synthetic import SyntheticSpec, make_synthetic


def synthetic(tmp_path_factory, **kw) -> Path:
    spec = SyntheticSpec(image_px=48, n_train=16, n_valid=4, n_test=4, **kw)
    return make_synthetic(tmp_path_factory.mktemp("syn") / spec.folder_name, spec)


def cases(samples):
    return {Path(s.name).parent.name if s.case else Path(s.name).stem.rsplit("_", 1)[0] for s in samples}


# ----------------------------------------------------------------------------- every layout


@pytest.mark.parametrize("kw, layout, channels, carved", [
    (dict(layout="coco"), "coco", 1, False),
    (dict(layout="pairs"), "pairs", 1, True),
    (dict(layout="pairs", presplit=True, channels=3), "pairs", 3, False),
    (dict(layout="pairs-beside", channels=4, bit_depth=16), "pairs", 4, True),
    (dict(layout="nnunet", channels=2, bit_depth=16), "nnunet", 2, True),
])
def test_every_layout_is_detected_and_loads(tmp_path_factory, tmp_path, kw, layout, channels, carved):
    root = synthetic(tmp_path_factory, **kw)
    dataset = open_dataset(root)
    assert (dataset.layout, dataset.channels, dataset.carved) == (layout, channels, carved)
    assert dataset.info.name == "built-in synthetic" and not dataset.info.is_kaggle_brain_tumor
    assert sum(dataset.info.split_sizes.values()) == 24
    data = load_dataset(dataset, 32, cache_dir=tmp_path)
    shape = (32, 32) if channels == 1 else (channels, 32, 32)
    for split in data.values():
        assert split.images.shape[1:] == shape and split.channels == channels and split.masks.shape[1:] == (32, 32)
        assert split.images.dtype == np.uint8 and set(np.unique(split.masks)) <= {0, 1}
    if channels > 1:  # the channels are distinct sequences, not copies
        assert not np.array_equal(data["train"].images[:, 0], data["train"].images[:, 1])
    native = data["test"].native_mask(slice(None))
    assert native.shape[1:] == (48, 48) and native.sum() > 0
    assert open_dataset(root, DataOptions(layout=layout)).layout == layout


def test_pairs_masks_are_the_written_outlines(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory, layout="pairs", presplit=True)
    valid = load_split(root, "valid", 48, native=True, cache_dir=tmp_path)
    for i, name in enumerate(valid.file_names):
        written = np.asarray(Image.open(root / name.replace("images", "masks"))) > 0
        np.testing.assert_array_equal(valid.native_mask(i), written)
        np.testing.assert_array_equal(valid.masks[i], written)  # same size: nearest is the identity


def test_16bit_is_percentile_normalised_per_channel():
    ramp = np.arange(1000, dtype=np.uint16).reshape(10, 100) * 7 + 500  # 500 .. 7493
    low, high = np.percentile(ramp.astype(float), (0.5, 99.5))
    out = to_uint8(ramp)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    expected = np.round(np.clip((ramp - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    two = to_uint8(np.stack([ramp, ramp // 7], -1))  # each channel on its own scale
    np.testing.assert_array_equal(two[..., 0], two[..., 1])


def test_labels_pick_foreground_and_unexplained_values_fail(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "valid", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / split / "images" / f"p{split}{i}_0.png")
            mask = np.zeros((8, 8), np.uint8)
            mask[0, :3], mask[1, :2] = 1, 2
            Image.fromarray(mask).save(root / split / "masks" / f"p{split}{i}_0.png")
    every = load_split(root, "test", 8, native=True, cache_dir=tmp_path / "c")
    assert every.native_mask(0).sum() == 5  # default: every non-zero value is tumour
    both = load_split(open_dataset(root, DataOptions(labels=(1, 2))), "test", 8, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(both.masks[0], every.native_mask(0))
    with pytest.raises(DataError, match=r"ptest0_0.png: mask value\(s\) \[1\] not explained by --labels 2"):
        load_split(open_dataset(root, DataOptions(labels=(2,))), "test", 8, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"ptest0_0.png: mask value\(s\) \[1, 2\] not explained by --labels 255"):
        load_split(open_dataset(root, DataOptions(labels=(255,))), "test", 8, cache_dir=tmp_path / "c")


def test_dev_data_arrays_unchanged(dev_data, tmp_path):
    # hashes of the arrays main's loader (before layouts) built for the dev data
    split = load_split(dev_data, "valid", 64, native=True, cache_dir=tmp_path)
    digest = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
              for a in (split.images, split.masks, split.native_masks)]
    assert digest == ["5e22d28a24f99817", "c4d778e87cae9a51", "60959b6b967ce328"]
    assert open_dataset(dev_data).info.is_kaggle_brain_tumor


def _rgb_pairs(root: Path, colours: list[bool], size=8) -> Path:
    """Pairs x00.png, x01.png, ... as RGB: black (bands equal) or with three different bands."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ramp = np.arange(size * size, dtype=np.uint8).reshape(size, size)
    for i, colour in enumerate(colours):
        rgb = np.stack([ramp, 255 - ramp, ramp // 2], -1) if colour else np.zeros((size, size, 3), np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"x{i:02d}.png")
        Image.fromarray(np.eye(size, dtype=np.uint8) * 255).save(root / "masks" / f"x{i:02d}.png")
    return root


def test_channels_probe_past_blank_leading_images(tmp_path):
    # first 8 black (bands equal, constant), last 4 colour: a 3-sequence dataset, not grey
    root = _rgb_pairs(tmp_path / "ds", [False] * 8 + [True] * 4)
    dataset = open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25)))
    assert dataset.channels == 3
    data = load_dataset(dataset, 8, cache_dir=tmp_path / "c")
    names = [n for s in data.values() for n in s.file_names]
    images = np.concatenate([s.images for s in data.values()])
    ramp = np.arange(64, dtype=np.uint8).reshape(8, 8)
    colour = images[[names.index(f"images/x{i:02d}.png") for i in range(8, 12)]]
    np.testing.assert_array_equal(colour, np.broadcast_to(np.stack([ramp, 255 - ramp, ramp // 2]), colour.shape))


def test_colour_image_in_a_grey_dataset_fails_naming_it(tmp_path):
    root = _rgb_pairs(tmp_path / "ds", [False] * 12)
    grey = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, -1)  # RGB of a grey ramp
    for i in range(11):
        Image.fromarray(grey).save(root / "images" / f"x{i:02d}.png")
    _rgb_pairs(tmp_path / "colour", [True])
    shutil.copy(tmp_path / "colour" / "images" / "x00.png", root / "images" / "x05.png")
    dataset = open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25)))
    assert dataset.channels == 1  # the probes saw 8 grey images first
    split = next(s for s in ("train", "valid", "test") if "images/x05.png" in {x.name for x in dataset.splits[s]})
    with pytest.raises(DataError) as err:
        load_split(dataset, split, 8, cache_dir=tmp_path / "c")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{root}/images/x05.png: the image has 3 channels but the dataset's other images are grey")


def test_tiff_rewritten_in_place_is_not_served_stale(tmp_path):
    # an uncompressed TIFF's size is fixed by its shape: only its time tells the cache it changed
    root = _pairs(tmp_path, n=4)
    for i in range(4):
        (root / "images" / f"x{i}.png").unlink()
        Image.fromarray(np.full((8, 8), 1000 * (i + 1), np.uint16)).save(root / "images" / f"x{i}.tif")
    tif = root / "images" / "x0.tif"
    options = DataOptions(split_fractions=(0.5, 0.25, 0.25))
    dataset = open_dataset(root, options)
    split = next(s for s in ("train", "valid", "test") if "images/x0.tif" in {x.name for x in dataset.splits[s]})
    index = [x.name for x in dataset.splits[split]].index("images/x0.tif")
    before = np.array(load_split(dataset, split, 8, cache_dir=tmp_path / "c").images[index])
    stat, fingerprint = tif.stat(), dataset.info.fingerprint
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 100).save(tif)
    os.utime(tif, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a re-export, later (any clock granularity)
    assert tif.stat().st_size == stat.st_size
    again = open_dataset(root, options)
    after = load_split(again, split, 8, cache_dir=tmp_path / "c").images[index]
    np.testing.assert_array_equal(after, to_uint8(np.arange(64, dtype=np.uint16).reshape(8, 8) * 100))
    assert not np.array_equal(before, after)
    assert again.info.fingerprint == fingerprint  # names, sizes and labels: same data, same fingerprint


# ----------------------------------------------------------------------------- grouped splits


def test_carve_is_grouped_by_case_and_seeded(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory, layout="pairs", slices_per_case=3)
    dataset = open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25)))
    per_split = {s: cases(dataset.splits[s]) for s in ("train", "valid", "test")}
    assert all(per_split.values())
    assert not (per_split["train"] & per_split["valid"] or per_split["train"] & per_split["test"]
                or per_split["valid"] & per_split["test"])
    again = open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25)))
    assert again.splits == dataset.splits and again.info.fingerprint == dataset.info.fingerprint
    other = open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25), split_seed=3))
    assert other.splits != dataset.splits and other.info.fingerprint != dataset.info.fingerprint
    # splits.json round trip: names relative to the folder, reused exactly
    dataset.write_splits(tmp_path / "splits.json")
    listed = json.loads((tmp_path / "splits.json").read_text())
    assert set(listed) == {"train", "valid", "test"} and all((root / n).is_file() for v in listed.values() for n in v)
    reused = open_dataset(root, DataOptions(splits_file=tmp_path / "splits.json", split_seed=3))
    assert reused.splits == dataset.splits and not reused.carved


def test_group_by_regex_and_case_folders(tmp_path_factory):
    nested = synthetic(tmp_path_factory, layout="pairs-beside", slices_per_case=4)
    dataset = open_dataset(nested)
    folders = {s: {Path(x.name).parent.as_posix() for x in dataset.splits[s]} for s in ("train", "valid", "test")}
    assert not (folders["train"] & folders["valid"] or folders["train"] & folders["test"] or folders["valid"] & folders["test"])
    flat = synthetic(tmp_path_factory, layout="pairs", slices_per_case=2)
    by_digit = open_dataset(flat, DataOptions(group_by=r"^case\d{3}(\d)"))  # cases k and k + 10 together
    groups = {s: {Path(x.name).stem[7] for x in by_digit.splits[s]} for s in ("train", "valid", "test")}
    assert all(groups.values())
    assert sum(len(g) for g in groups.values()) == len(set().union(*groups.values()))


def test_cross_split_duplicates_are_counted(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory, layout="pairs", presplit=True)
    for i, name in enumerate(sorted((root / "test" / "images").iterdir())[:2]):
        source = sorted((root / "train" / "images").iterdir())[i]
        shutil.copy(source, name)
    data = load_dataset(open_dataset(root), 32, cache_dir=tmp_path)
    dup = cross_split_duplicates(data)
    assert dup["valid"] == [] and len(dup["test"]) == 2
    assert dup["test"][0] == ("test/images/case2000_0.png", "train/images/case0000_0.png")


# ----------------------------------------------------------------------------- inspect


def test_inspect_boxes_baselines_and_cli(tmp_path):
    root = tmp_path / "boxes"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(12):  # 12 cases; masks: a 4x4 box at (2, 2); case 11 empty
        Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(root / "images" / f"c{i}_1.png")
        mask = np.zeros((16, 16), np.uint8)
        if i < 11:
            mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(root / "masks" / f"c{i}_1.png")
    dataset = open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25)))
    report = inspect(dataset, 16, tmp_path / "cache")
    assert report["labels_are"] == "boxes" and report["components"] == report["rectangle_components"] == 11
    assert report["splits"]["train"]["cases"] == 6 and report["sizes"] == {"16x16": 12}
    test_empty = report["splits"]["test"]["empty_mask_share"]
    assert report["baselines_test_dice"]["all_background"] == pytest.approx(test_empty)
    # every training box is the same box, so the mean box is exact on non-empty test masks
    assert report["train_mean_box"] == pytest.approx((2 / 16, 2 / 16, 6 / 16, 6 / 16))
    assert report["baselines_test_dice"]["train_mean_box"] == pytest.approx(1 - test_empty)
    assert report["tumour_area_quantiles"]["q50"] == pytest.approx(16 / 256)
    assert report_lines(report)[1].endswith("(carved by case)")
    proc = run_cli("-m", "tumorseg.data", str(root), "--json", "--split", "0.5,0.25,0.25", "--size", "16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dataset"]["layout"] == "pairs"


# ----------------------------------------------------------------------------- bad input


def _pairs(tmp_path, n=8, size=8) -> Path:
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((size, size), 50, np.uint8)).save(root / "images" / f"x{i}.png")
        Image.fromarray(np.eye(size, dtype=np.uint8) * 255).save(root / "masks" / f"x{i}.png")
    return root


def test_image_without_mask_fails_or_is_skipped(tmp_path):
    root = _pairs(tmp_path)
    (root / "masks" / "x3.png").unlink()
    with pytest.raises(DataError, match=r"images/x3.png: image has no mask .*--allow-unlabelled"):
        open_dataset(root)
    assert open_dataset(root, DataOptions(allow_unlabelled=True)).skipped_unlabelled == 1


def test_mask_without_image(tmp_path):
    root = _pairs(tmp_path)
    (root / "images" / "x5.png").unlink()
    with pytest.raises(DataError, match=r"masks/x5.png: mask has no image"):
        open_dataset(root)


def test_image_and_mask_sizes_differ_names_both(tmp_path):
    root = _pairs(tmp_path)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "masks" / "x2.png")
    with pytest.raises(DataError, match=r"images/x2.png is 8x8 but its mask .*masks/x2.png is 8x9"):
        open_dataset(root)


def test_truncated_tiff(tmp_path):
    root = _pairs(tmp_path, size=64)
    tif = root / "images" / "x1.tif"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tif)
    (root / "images" / "x1.png").unlink()
    tif.write_bytes(tif.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"images/x1.tif: unreadable or truncated image"):
        load_dataset(open_dataset(root, DataOptions(split_fractions=(0.5, 0.25, 0.25))), 8, cache_dir=tmp_path / "c")


def test_no_images_left(tmp_path):
    root = _pairs(tmp_path, n=2)
    for mask in (root / "masks").iterdir():
        mask.unlink()
    (root / "masks" / ".keep").touch()
    with pytest.raises(DataError, match=r"bad: no images left \(2 unlabelled image\(s\) skipped\)"):
        open_dataset(root, DataOptions(allow_unlabelled=True))


def test_group_by_matching_nothing(tmp_path):
    root = _pairs(tmp_path)
    with pytest.raises(ConfigError, match=r"--group-by .* does not match images/x0.png \(stem 'x0'\)"):
        open_dataset(root, DataOptions(group_by=r"patient(\d+)"))


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="--split 0.7,0.2,0.2: fractions sum to 1.1, not 1"):
        parse_fractions("0.7,0.2,0.2")
    with pytest.raises(ConfigError, match="sum to 0.9"):
        DataOptions(split_fractions=(0.7, 0.1, 0.1))


def test_split_that_would_be_empty(tmp_path):
    root = _pairs(tmp_path, n=2)
    with pytest.raises(DataError, match=r"^default split 0.7,0.15,0.15: the valid split would be empty \(2 image\(s\) "
                                        r"in 2 case\(s\) to carve from\); pass --group-by REGEX"):
        open_dataset(root)
    more = _pairs(tmp_path / "more")
    with pytest.raises(DataError, match=r"^--split 1,0,0: the valid split would be empty \(8 image\(s\) in 8 case\(s\) "
                                        r"to carve from\); pass --split with larger valid and test fractions$"):
        open_dataset(more, DataOptions(split_fractions=(1, 0, 0)))


def test_nnunet_channel_file_missing(tmp_path_factory, tmp_path):
    root = tmp_path / "nn"
    shutil.copytree(synthetic(tmp_path_factory, layout="nnunet", channels=3), root)
    (root / "imagesTr" / "case0002_1_0001.png").unlink()
    with pytest.raises(DataError, match=r"imagesTr/case0002_1_0001.png: channel file missing for case case0002_1 .*3 channel"):
        open_dataset(root)


def test_bad_data_cli_is_one_line_exit_2(tmp_path):
    root = _pairs(tmp_path)
    (root / "images" / "x5.png").unlink()
    proc = run_cli("-m", "tumorseg.data", str(root))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"tumorseg.data: error: {root}/masks/x5.png: mask has no image"]
    proc = run_cli("-m", "tumorseg.data", str(root), "--split", "0.5,0.5,0.5")
    assert proc.returncode == 2 and "--split" in proc.stderr and "sum to 1.5" in proc.stderr


# ----------------------------------------------------------------------------- model and augmentation


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_first_conv_adapted_like_smp(channels):
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    from tumorseg.model import create_model

    torch.manual_seed(0)
    reference = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=1)
    state = {k: v.clone() for k, v in reference.encoder.state_dict().items()}
    patch_first_conv(reference.encoder, channels, pretrained=True)
    ours = create_model(state, in_channels=channels).eval()
    torch.testing.assert_close(ours.encoder.conv1.weight, reference.encoder.conv1.weight)
    assert ours(torch.zeros(1, channels, 32, 32)).shape == (1, 1, 32, 32)


def test_augmentation_moves_channels_and_mask_together():
    import albumentations as A

    from tumorseg.transforms import AugmentedArrays

    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[:, :, 0] = 1
    flip = A.Compose([A.HorizontalFlip(p=1)])
    image, mask = AugmentedArrays(images, masks, flip)[1]
    assert image.shape == (3, 4, 4) and mask.shape == (1, 4, 4)
    np.testing.assert_array_equal(image.numpy(), images[1][:, :, ::-1])
    assert mask[0, :, 3].all() and not mask[0, :, 0].any()
    grey, _ = AugmentedArrays(images[:, 0], masks, None)[0]
    assert grey.shape == (1, 4, 4)
