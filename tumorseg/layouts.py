"""Find a dataset's layout and list its samples per split (no pixel is decoded here).

Three layouts, detected in this order (``detect_layout``) or forced with ``--layout``:

- ``nnunet`` (2D): ``dataset.json`` (``channel_names``, ``labels``, ``file_ending``) with
  ``imagesTr/CASE_0000.png [CASE_0001.png ...]`` (one file per channel) and ``labelsTr/CASE.png``;
  ``imagesTs`` + ``labelsTs`` are the test split when present. A case is an nnU-Net case id.
- ``coco``: split folders ``train``, ``valid`` (or ``val``), ``test``, each with its images and
  ``_annotations.coco.json`` (the Kaggle/Roboflow export).
- ``pairs``: ``DIR/images/X.*`` with ``DIR/masks/X.*`` (same stem, extensions may differ), or
  masks beside their images named ``X_mask.*`` (the LGG "kaggle_3m" convention), flat or in case
  folders (``DIR/CASE/slice_7.tif`` + ``DIR/CASE/slice_7_mask.tif``); optionally already split
  into ``DIR/{train,valid,test}/...``. A sub-folder of the images is that image's case.

Each reader returns ``pools``: ``{"train": [...], "valid": [...], "test": [...]}`` with the
splits the data has, or ``{"all": [...]}`` when it has none (``tumorseg.splits`` carves them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tumorseg.coco import ANNOTATIONS, read_split
from tumorseg.errors import DataError
from tumorseg.imageio import is_image_file, read_header

LAYOUTS = ("coco", "pairs", "nnunet")
SPLIT_DIRS = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
MASK_SUFFIX = "_mask"
NNUNET_JSON = "dataset.json"


@dataclass(frozen=True)
class Sample:
    """One image (one or more channel files) and its label."""

    name: str  # the image's path relative to the dataset folder: its id in splits.json
    images: tuple[str, ...]  # image file(s) relative to the dataset folder; one per channel file
    mask: str | None  # mask file relative to the dataset folder (None for COCO polygons)
    case: str | None  # case folder or nnU-Net case id; None: the --group-by rule decides
    hw: tuple[int, int]
    bands: int | None = None  # channels in the file before the grey check (None: not read)
    bit_depth: int = 8
    polygons: tuple | None = None  # COCO: flat [x0, y0, ...] polygons in native pixels
    display_name: str = ""  # what reports show (COCO: the file name, as before)

    @property
    def label(self) -> str:
        return self.display_name or self.name


@dataclass
class LayoutRead:
    layout: str
    pools: dict[str, list[Sample]]
    label_values: tuple[int, ...] | None = None  # labels the dataset declares (dataset.json)
    channel_names: tuple[str, ...] | None = None
    skipped_unlabelled: int = 0


def split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def detect_layout(root: Path) -> str:
    """``coco``, ``pairs`` or ``nnunet`` from what ``root`` holds; a DataError when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if (root / NNUNET_JSON).is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    if any((d / ANNOTATIONS).is_file() for s in SPLIT_DIRS if (d := split_dir(root, s)) is not None):
        return "coco"
    if _has_pairs(root):
        return "pairs"
    raise DataError(
        f"no dataset found in {root} (coco: split folder missing: {root / 'train'} with {ANNOTATIONS}; "
        f"pairs: no images/ + masks/ folders and no X + X{MASK_SUFFIX} files; nnunet: no {NNUNET_JSON} + imagesTr/)"
    )


def _has_pairs(root: Path) -> bool:
    folders = [root] + [d for s in SPLIT_DIRS if (d := split_dir(root, s)) is not None]
    if any((f / "images").is_dir() and (f / "masks").is_dir() for f in folders):
        return True
    return any(is_image_file(p) and p.stem.endswith(MASK_SUFFIX) for p in root.rglob("*"))


def read_layout(root: Path, layout: str, *, allow_unlabelled: bool = False) -> LayoutRead:
    """The samples of ``root`` read as ``layout`` (``auto``: detected)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    reader = {"coco": _read_coco, "pairs": _read_pairs, "nnunet": _read_nnunet}[layout]
    read = reader(root, allow_unlabelled)
    if not any(read.pools.values()):
        skipped = f" ({read.skipped_unlabelled} unlabelled image(s) skipped)" if read.skipped_unlabelled else ""
        raise DataError(f"{root}: no images left{skipped}")
    return read


# ----------------------------------------------------------------------------- coco


def _read_coco(root: Path, allow_unlabelled: bool) -> LayoutRead:
    pools = {}
    for split in SPLIT_DIRS:
        folder = split_dir(root, split)
        if folder is None:
            continue
        if not (folder / ANNOTATIONS).is_file():
            raise DataError(f"annotation file not found: {folder / ANNOTATIONS}")
        pools[split] = [
            Sample(
                name=f"{folder.name}/{r.file_name}",
                images=(f"{folder.name}/{r.file_name}",),
                mask=None,
                case=None,
                hw=(r.height, r.width),
                polygons=r.polygons,
                display_name=r.file_name,
            )
            for r in read_split(folder)
        ]
    if not pools:
        raise DataError(f"split folder missing: {root / 'train'} (expected {', '.join(SPLIT_DIRS)} under {root})")
    return LayoutRead("coco", pools)


# ----------------------------------------------------------------------------- pairs


def _read_pairs(root: Path, allow_unlabelled: bool) -> LayoutRead:
    folders = {s: d for s in SPLIT_DIRS if (d := split_dir(root, s)) is not None}
    if not folders:
        folders = {"all": root}
    pools, skipped = {}, 0
    for split, folder in folders.items():
        pools[split], n = _read_pairs_folder(root, folder, allow_unlabelled)
        skipped += n
    return LayoutRead("pairs", pools, skipped_unlabelled=skipped)


def _index(files, base: Path, what: str) -> dict[str, Path]:
    """``{relative path without suffix: file}``; two files differing only in suffix are an error."""
    out: dict[str, Path] = {}
    for path in files:
        key = path.relative_to(base).with_suffix("").as_posix()
        if key in out:
            raise DataError(f"{out[key]} and {path}: two {what} with the same name")
        out[key] = path
    return out


def _read_pairs_folder(root: Path, folder: Path, allow_unlabelled: bool) -> tuple[list[Sample], int]:
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        image_base, mask_base = folder / "images", folder / "masks"
        images = _index(sorted(p for p in image_base.rglob("*") if is_image_file(p)), image_base, "images")
        masks = _index(sorted(p for p in mask_base.rglob("*") if is_image_file(p)), mask_base, "masks")
        expected = f"{mask_base}/<same name>.*"
    else:
        image_base = folder
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))
        masks = _index([p for p in files if p.stem.endswith(MASK_SUFFIX)], folder, "masks")
        masks = {key[: -len(MASK_SUFFIX)]: path for key, path in masks.items()}
        images = _index([p for p in files if not p.stem.endswith(MASK_SUFFIX)], folder, "images")
        expected = f"<name>{MASK_SUFFIX}.* beside it"
    for key, mask in masks.items():
        if key not in images:
            raise DataError(f"{mask}: mask has no image")
    samples, skipped = [], 0
    for key, image in images.items():
        mask = masks.get(key)
        if mask is None:
            if allow_unlabelled:
                skipped += 1
                continue
            raise DataError(f"{image}: image has no mask (expected {expected}); --allow-unlabelled skips such images")
        header, mask_header = read_header(image), read_header(mask)
        if header.hw != mask_header.hw:
            raise DataError(
                f"{image} is {header.hw[1]}x{header.hw[0]} but its mask {mask} is {mask_header.hw[1]}x{mask_header.hw[0]}"
            )
        parent = image.relative_to(image_base).parent.as_posix()
        samples.append(Sample(
            name=image.relative_to(root).as_posix(),
            images=(image.relative_to(root).as_posix(),),
            mask=mask.relative_to(root).as_posix(),
            case=None if parent == "." else parent,
            hw=header.hw,
            bands=header.bands,
            bit_depth=header.bit_depth,
        ))
    return samples, skipped


# ----------------------------------------------------------------------------- nnU-Net


def _read_nnunet(root: Path, allow_unlabelled: bool) -> LayoutRead:
    path = root / NNUNET_JSON
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DataError(f"{path}: missing 'channel_names' (e.g. {{\"0\": \"FLAIR\"}})")
    try:
        channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    except ValueError:
        raise DataError(f"{path}: 'channel_names' keys must be channel indices 0, 1, ...") from None
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: missing 'labels' (e.g. {{\"background\": 0, \"tumour\": 1}})")
    if all(isinstance(v, int) for v in labels.values()):
        label_values = tuple(sorted(labels.values()))  # v2: name -> id
    else:
        try:
            label_values = tuple(sorted(int(k) for k in labels))  # v1: "id" -> name
        except ValueError:
            raise DataError(f"{path}: 'labels' must map names to integer ids") from None
    ending = meta.get("file_ending", ".png")
    pools, skipped = {}, 0
    pools["all"], n = _read_nnunet_pool(root, "imagesTr", "labelsTr", ending, len(channel_names), allow_unlabelled)
    skipped += n
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        pools["test"], n = _read_nnunet_pool(root, "imagesTs", "labelsTs", ending, len(channel_names), allow_unlabelled)
        skipped += n
    return LayoutRead("nnunet", pools, label_values, channel_names, skipped)


def _read_nnunet_pool(root, images_name, labels_name, ending, n_channels, allow_unlabelled):
    images_dir, labels_dir = root / images_name, root / labels_name
    if not labels_dir.is_dir():
        raise DataError(f"label folder not found: {labels_dir}")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if not path.name.endswith(ending) or path.name.startswith("."):
            continue
        match = re.fullmatch(r"(.+)_(\d{4})", path.name[: -len(ending)])
        if match is None:
            raise DataError(f"{path}: not named CASE_XXXX{ending} (XXXX: the channel index)")
        channel = int(match.group(2))
        if channel >= n_channels:
            raise DataError(f"{path}: channel {channel} but {root / NNUNET_JSON} names {n_channels} channel(s)")
        cases.setdefault(match.group(1), {})[channel] = path
    labels = {p.name[: -len(ending)]: p for p in labels_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")}
    for case, label in sorted(labels.items()):
        if case not in cases:
            raise DataError(f"{label}: mask has no image (expected {images_dir}/{case}_0000{ending})")
    samples, skipped = [], 0
    for case, files in sorted(cases.items()):
        missing = [c for c in range(n_channels) if c not in files]
        if missing:
            raise DataError(
                f"{images_dir / f'{case}_{missing[0]:04d}{ending}'}: channel file missing for case {case} "
                f"({root / NNUNET_JSON} names {n_channels} channel(s))"
            )
        label = labels.get(case)
        if label is None:
            if allow_unlabelled:
                skipped += 1
                continue
            raise DataError(f"{files[0]}: image has no mask (expected {labels_dir / (case + ending)}); --allow-unlabelled skips such images")
        header = read_header(files[0])
        for path in [*(files[c] for c in range(1, n_channels)), label]:
            other = read_header(path).hw
            if other != header.hw:
                raise DataError(f"{files[0]} is {header.hw[1]}x{header.hw[0]} but {path} is {other[1]}x{other[0]}")
        samples.append(Sample(
            name=files[0].relative_to(root).as_posix(),
            images=tuple(files[c].relative_to(root).as_posix() for c in range(n_channels)),
            mask=label.relative_to(root).as_posix(),
            case=case,
            hw=header.hw,
            bands=n_channels,
            bit_depth=header.bit_depth,
            display_name=case,
        ))
    return samples, skipped
