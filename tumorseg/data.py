"""Any supported dataset folder -> cached arrays per split. The one entry point for data.

    dataset = open_dataset(DIR, DataOptions(...))   # layout, samples per split, channels, info
    data = load_dataset(dataset, size_px)           # {"train": Split, "valid": Split, "test": Split}
    dataset.write_splits(run_dir / "splits.json")   # when the splits were carved

``open_dataset`` detects the layout (``tumorseg.layouts``: coco, pairs, nnunet), lists the samples
(reading file headers only), and carves missing valid/test splits by case (``tumorseg.splits``).
The channel count follows the data (``tumorseg.imageio``): nnU-Net channel files, or the bands of
the images, where a colour image whose bands are equal counts as grey (decided from every header
and probes spread over the dataset; the cache build refuses a colour image in a grey dataset).

Each split is decoded and resized once per size, then kept in an on-disk cache of ``.npy`` files
keyed by the split's content (image names and sizes, labels, the options that change pixels) and
its files' modification times, and opened memory-mapped, so later runs and trials never decode an
image. Validation and test also keep their masks at native resolution (bit-packed), since metrics
are computed there; that needs one native size per split.

``python -m tumorseg.data DIR`` describes a dataset (``tumorseg.inspect_data``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tumorseg.coco import ANNOTATIONS, ImageRecord, rasterize, read_split  # noqa: F401 (re-exported)
from tumorseg.errors import ConfigError, DataError
from tumorseg.imageio import NORMALISATION, bands_equal, check_gray, decode_channels, decode_gray, read_mask, read_pixels, resize_mask
from tumorseg.layouts import LAYOUTS, Sample, read_layout
from tumorseg.splits import DEFAULT_FRACTIONS, SPLITS, carve, check_fractions, parse_fractions, read_splits, write_splits

CACHE_VERSION = 2  # bump when the cached arrays' meaning changes
SPLITS_JSON = "splits.json"  # the carve, as written into a run folder
SYNTHETIC_MARKER = ".tumorseg-synthetic"  # written by tumorseg.synthetic into every layout it writes
GREY_PROBES = 8  # non-constant multi-band images decoded to decide grey (equal bands) or colour, by majority


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class DataOptions:
    """How to read a dataset folder; the CLIs add these flags with ``add_data_arguments``."""

    layout: str = "auto"
    labels: tuple[int, ...] | None = None  # foreground label ids (None: every non-zero value)
    split_fractions: tuple[float, float, float] | None = None  # None: 0.7,0.15,0.15 where needed
    split_seed: int = 0
    group_by: str | None = None
    splits_file: Path | None = None
    allow_unlabelled: bool = False

    def __post_init__(self):
        if self.layout not in ("auto", *LAYOUTS):
            raise ConfigError(f"--layout: expected auto, {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.split_fractions is not None:
            check_fractions(tuple(self.split_fractions))
        if self.labels is not None and (not self.labels or any(k <= 0 for k in self.labels)):
            raise ConfigError(f"--labels: expected label ids > 0, got {self.labels}")

    def to_dict(self) -> dict:
        """JSON-able (for sweep.json)."""
        out = asdict(self)
        out["splits_file"] = str(self.splits_file) if self.splits_file else None
        return out

    @classmethod
    def from_dict(cls, values: dict | None) -> DataOptions:
        values = dict(values or {})
        for key in ("labels", "split_fractions"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if values.get("splits_file"):
            values["splits_file"] = Path(values["splits_file"])
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataOptions:
        return cls(args.layout, args.labels, args.split, args.split_seed, args.group_by, args.splits, args.allow_unlabelled)


def _argtype(parse):
    def convert(text):
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    return convert


def _parse_labels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--labels: expected comma-separated label ids, got {text!r}") from None


def add_data_arguments(parser) -> None:
    """Add ``--layout --labels --split --split-seed --group-by --splits --allow-unlabelled``."""
    g = parser.add_argument_group("data") if isinstance(parser, argparse.ArgumentParser) else parser
    g.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto", help="dataset layout (default: detected)")
    g.add_argument("--labels", type=_argtype(_parse_labels), default=None, metavar="K[,K...]",
                   help="mask values that are tumour (default: every non-zero value)")
    g.add_argument("--split", type=_argtype(parse_fractions), default=None, metavar="TRAIN,VALID,TEST",
                   help=f"fractions for carving missing splits by case (default {','.join(map(str, DEFAULT_FRACTIONS))})")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the carve (default 0)")
    g.add_argument("--group-by", default=None, metavar="REGEX",
                   help="case of an image: first capture group of REGEX on its file stem "
                        "(default: its case folder, else the stem without a trailing _<digits>)")
    g.add_argument("--splits", type=Path, default=None, metavar="FILE", help="reuse a splits.json")
    g.add_argument("--allow-unlabelled", action="store_true", help="skip images without a mask (and say how many)")


# ----------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class DatasetInfo:
    """Which data a result is on (recorded in run folders and reports)."""

    path: str
    name: str  # the folder's name, or "built-in synthetic"
    layout: str
    fingerprint: str  # content hash of every split (names, sizes, labels, options; not file times)
    channels: int
    split_sizes: dict[str, int]
    splits_from: str  # "data" (its own split folders), "carved" (by case, now) or "file" (--splits / a run's splits.json)
    is_kaggle_brain_tumor: bool  # the Roboflow "TumorSegmentation" export the seed was measured on

    def describe(self) -> str:
        return f"{self.name} ({self.layout}, {self.channels} channel(s), fingerprint {self.fingerprint}) at {self.path}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Dataset:
    root: Path
    layout: str
    splits: dict[str, list[Sample]]  # train, valid, test
    channels: int
    options: DataOptions = field(default_factory=DataOptions)
    carved: bool = False
    skipped_unlabelled: int = 0
    label_values: tuple[int, ...] | None = None  # declared by dataset.json
    channel_names: tuple[str, ...] | None = None
    split_keys: dict[str, str] = field(default_factory=dict)  # cache key per split
    info: DatasetInfo | None = None

    def write_splits(self, path: Path) -> None:
        write_splits(path, self.splits)


def open_dataset(data_dir: Path, options: DataOptions = DataOptions()) -> Dataset:
    """Detect, list and split ``data_dir`` (headers only; nothing is decoded but a few probes)."""
    root = Path(data_dir)
    read = read_layout(root, options.layout, allow_unlabelled=options.allow_unlabelled)
    if read.layout == "coco" and options.labels is not None:
        raise ConfigError("--labels: COCO annotations have no label values (every category is tumour)")
    if options.splits_file is not None:
        splits, carved = read_splits(options.splits_file, read.pools, root), False
    else:
        if read.layout == "coco" and options.split_fractions is None:
            for split in SPLITS:
                if split not in read.pools:
                    raise DataError(
                        f"split folder missing: {root / split} (or pass --split TRAIN,VALID,TEST to carve it from train)"
                    )
        splits, carved = carve(read.pools, options.split_fractions, seed=options.split_seed, group_by=options.group_by)
    contents = {s: _split_content(root, splits[s]) for s in SPLITS}  # (content, mtimes); also: every file is there
    channels = len(read.channel_names) if read.channel_names else _channels(root, splits)
    dataset = Dataset(root, read.layout, splits, channels, options, carved, read.skipped_unlabelled,
                      read.label_values, read.channel_names)
    dataset.split_keys = {s: _split_key(dataset, s, *contents[s]) for s in SPLITS}
    content_keys = "".join(_split_key(dataset, s, contents[s][0]) for s in SPLITS)  # a copy keeps its fingerprint
    digest = hashlib.sha256(content_keys.encode()).hexdigest()[:16]
    synthetic = (root / SYNTHETIC_MARKER).is_file()
    dataset.info = DatasetInfo(
        path=str(root.resolve()),
        name="built-in synthetic" if synthetic else root.resolve().name,
        layout=read.layout,
        fingerprint=digest,
        channels=channels,
        split_sizes={s: len(splits[s]) for s in SPLITS},
        splits_from="file" if options.splits_file is not None else "carved" if carved else "data",
        is_kaggle_brain_tumor=read.layout == "coco" and not synthetic and _is_kaggle_export(root),
    )
    return dataset


def _is_kaggle_export(root: Path) -> bool:
    readme = root / "README.roboflow.txt"
    return readme.is_file() and "TumorSegmentation" in readme.read_text(errors="replace")


def _channels(root: Path, splits: dict[str, list[Sample]]) -> int:
    """1 when the images have one band or equal bands, else the bands of the colour images.

    Headers say which images have several bands; of those, up to ``GREY_PROBES`` non-constant
    probes spread over the whole dataset (``_spread``) are decoded and the majority decides, so
    blank edge slices (constant: skipped) or one corrupt file cannot decide for the rest. The cache
    build checks every image against the decision (``decode_sample``), so the minority is never
    silently converted: it fails with its file named.
    """
    samples = [s for split in SPLITS for s in splits[split]]
    multi = [s for s in samples if s.bands is None or s.bands > 1]
    grey, colour = 0, []
    for sample in _spread(multi):
        pixels = read_pixels(root / sample.images[0])
        if pixels.min() == pixels.max():
            continue
        if bands_equal(pixels):
            grey += 1
        else:
            colour.append((sample, pixels.shape[2]))
        if grey + len(colour) == GREY_PROBES:
            break
    if len(colour) <= grey:
        return 1
    example, channels = colour[0]
    for sample in samples:
        if sample.bands == 1:  # other mismatches are caught when decoding
            raise DataError(
                f"{root / sample.images[0]} has {sample.bands} channel(s) but the dataset's images have "
                f"{channels} (e.g. {root / example.images[0]})"
            )
    return channels


def _spread(items: list) -> list:
    """``items`` reordered so that any prefix is spread over the whole list (bit-reversed indices:
    0, 1/2, 1/4, 3/4, ... of the way through), not bunched at its start."""
    bits = max(len(items) - 1, 0).bit_length()
    reverse = lambda i: int(f"{i:0{bits}b}"[::-1], 2) if bits else 0  # noqa: E731
    return [items[i] for i in sorted(range(len(items)), key=reverse)]


def _split_content(root: Path, samples: list[Sample]) -> tuple[bytes, bytes]:
    """Digests of what a split holds: image names and sizes, and its labels (mask bytes or polygons);
    and of its files' modification times (an uncompressed TIFF re-exported in place keeps its size)."""
    content, mtimes = hashlib.sha256(), hashlib.sha256()
    for sample in samples:
        content.update(f"|{sample.name}".encode())
        for rel in sample.images:
            stat = _stat(root / rel)
            content.update(f":{stat.st_size}".encode())
            mtimes.update(f":{stat.st_mtime_ns}".encode())
        if sample.polygons is not None:
            content.update(repr((sample.hw, sample.polygons)).encode())
        else:
            content.update(_read_bytes(root / sample.mask))
            mtimes.update(f"|{_stat(root / sample.mask).st_mtime_ns}".encode())
    return content.digest(), mtimes.digest()


def _split_key(dataset: Dataset, split: str, content: bytes, mtimes: bytes = b"") -> str:
    """Cache key of one split: its content (and file times) and the options that change its arrays."""
    digest = hashlib.sha256(f"tumorseg-cache-v{CACHE_VERSION}|{dataset.layout}|{split}".encode())
    digest.update(f"|channels {dataset.channels}|labels {dataset.options.labels}|{NORMALISATION}|".encode())
    digest.update(content + mtimes)
    return digest.hexdigest()[:16]


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise DataError(f"image listed in {ANNOTATIONS} but missing: {path}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None


# ----------------------------------------------------------------------------- decoding one sample


def decode_sample(dataset: Dataset, sample: Sample, size_px: int | None) -> np.ndarray:
    """uint8 ``(S, S)`` for one channel, ``(C, S, S)`` for more (``size_px`` None: native)."""
    root = dataset.root
    if dataset.channels == 1 or len(sample.images) > 1:  # one grey file per channel
        grey = []
        for rel in sample.images:
            check_gray(root / rel, _why_grey(dataset))
            grey.append(decode_gray(root / rel, size_px, sample.hw))
        return grey[0] if dataset.channels == 1 else np.stack(grey)
    image = decode_channels(root / sample.images[0], size_px)
    if image.shape[0] != dataset.channels:
        raise DataError(f"{root / sample.images[0]} has {image.shape[0]} channel(s) but the dataset has {dataset.channels}")
    return image


def _why_grey(dataset: Dataset) -> str:
    if dataset.channel_names:
        return f"{dataset.root / 'dataset.json'} gives one grey file per channel"
    return "the dataset's other images are grey, so it was read as 1 channel (mixed grey and colour is not supported)"


def sample_mask(dataset: Dataset, sample: Sample, hw: tuple[int, int] | None = None) -> np.ndarray:
    """The {0, 1} uint8 mask of ``sample`` at ``hw`` (default: native)."""
    hw = tuple(hw or sample.hw)
    if sample.polygons is not None:
        return rasterize(sample.polygons, sample.hw, hw)
    path = dataset.root / sample.mask
    labels = read_mask(path)
    if labels.shape != tuple(sample.hw):
        raise DataError(f"{dataset.root / sample.images[0]} is {sample.hw[1]}x{sample.hw[0]} but its mask {path} is {labels.shape[1]}x{labels.shape[0]}")
    wanted = dataset.options.labels
    if wanted is None:
        mask = (labels != 0).astype(np.uint8)
    else:
        explained = {0, *wanted, *(dataset.label_values or ())}
        stray = sorted(int(v) for v in np.unique(labels) if int(v) not in explained)
        if stray:
            raise DataError(f"{path}: mask value(s) {stray[:5]} not explained by --labels {','.join(map(str, wanted))}")
        mask = np.isin(labels, wanted).astype(np.uint8)
    return mask if hw == tuple(sample.hw) else resize_mask(mask, hw[0])


# ----------------------------------------------------------------------------- cached splits


@dataclass
class Split:
    """One split at one training size, as arrays (memory-mapped from the cache when loaded)."""

    name: str
    images: np.ndarray  # (N, S, S) uint8 for one channel, (N, C, S, S) for more
    masks: np.ndarray  # (N, S, S) uint8 {0, 1} at S
    native_masks: np.ndarray | None  # (N, H, ceil(W / 8)) uint8, bit-packed masks at native H x W
    native_hw: tuple[int, int]
    file_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size_px(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[1])

    def native_mask(self, index) -> np.ndarray:
        """Unpacked native-resolution mask(s) for an index or slice, uint8 {0, 1}."""
        if self.native_masks is None:
            raise ValueError(f"split {self.name!r} was loaded without native masks")
        return np.unpackbits(self.native_masks[index], axis=-1, count=self.native_hw[1])


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUMORSEG_CACHE_DIR", Path.home() / ".cache" / "tumorseg"))


def load_split(
    data: Dataset | Path,
    split: str,
    size_px: int,
    *,
    native: bool = False,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> Split:
    """Arrays of one split at ``size_px``, built once and then memory-mapped from cache.

    ``data``: an ``open_dataset`` result, or a folder (opened with the default options).
    ``native=True`` also loads the bit-packed masks at native resolution (for metrics).
    """
    dataset = data if isinstance(data, Dataset) else open_dataset(Path(data))
    samples = dataset.splits[split]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"{split}-{dataset.split_keys[split]}"

    def entry(name: str, build) -> Path:
        target = root / name
        if not (target / "done").is_file():
            _build_atomically(target, build)
        return target

    sized = entry(f"{size_px}px", lambda tmp: _build_sized(dataset, split, size_px, tmp, workers))
    meta = json.loads((sized / "meta.json").read_text())
    native_masks = None
    if native:
        native_dir = entry("native", lambda tmp: _build_native(dataset, split, tmp))
        native_masks = np.load(native_dir / "masks_packed.npy", mmap_mode="r")
    return Split(
        name=split,
        images=np.load(sized / "images.npy", mmap_mode="r"),
        masks=np.load(sized / "masks.npy", mmap_mode="r"),
        native_masks=native_masks,
        native_hw=tuple(meta["native_hw"]),
        file_names=tuple(s.label for s in samples),
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


def native_hw(dataset: Dataset, split: str) -> tuple[int, int]:
    """The split's one native size (a DataError naming two files when there are several)."""
    samples = dataset.splits[split]
    first = samples[0]
    for sample in samples:
        if sample.hw != first.hw:
            raise DataError(
                f"{dataset.root / sample.images[0]} is {sample.hw[1]}x{sample.hw[0]} but "
                f"{dataset.root / first.images[0]} is {first.hw[1]}x{first.hw[0]}: tumorseg needs one native "
                f"size per split ({split})"
            )
    return first.hw


def _build_sized(dataset: Dataset, split: str, size_px: int, out: Path, workers: int | None) -> None:
    from tqdm.auto import tqdm

    samples = dataset.splits[split]
    hw = native_hw(dataset, split)
    channel_shape = () if dataset.channels == 1 else (dataset.channels,)
    images = np.lib.format.open_memmap(out / "images.npy", "w+", np.uint8, (len(samples), *channel_shape, size_px, size_px))
    masks = np.lib.format.open_memmap(out / "masks.npy", "w+", np.uint8, (len(samples), size_px, size_px))

    def work(i: int) -> None:
        images[i] = decode_sample(dataset, samples[i], size_px)
        masks[i] = sample_mask(dataset, samples[i], (size_px, size_px))

    # PIL releases the GIL while decoding, so threads use every core without pickling arrays.
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        jobs = pool.map(work, range(len(samples)))
        desc = f"caching {split} at {size_px}px"
        for _ in tqdm(jobs, total=len(samples), desc=desc, unit="img", file=sys.stderr, mininterval=1.0, disable=None):
            pass
    images.flush()
    masks.flush()
    meta = {"native_hw": hw, "file_names": [s.name for s in samples], "size_px": size_px, "channels": dataset.channels}
    (out / "meta.json").write_text(json.dumps(meta))


def _build_native(dataset: Dataset, split: str, out: Path) -> None:
    samples = dataset.splits[split]
    height, width = native_hw(dataset, split)
    packed = np.lib.format.open_memmap(out / "masks_packed.npy", "w+", np.uint8, (len(samples), height, (width + 7) // 8))
    for i, sample in enumerate(samples):
        packed[i] = np.packbits(sample_mask(dataset, sample), axis=-1)
    packed.flush()


def load_dataset(
    data: Dataset | Path,
    size_px: int,
    splits=SPLITS,
    cache_dir: Path | None = None,
    *,
    options: DataOptions | None = None,
) -> dict[str, Split]:
    """The named splits at ``size_px``; evaluation splits carry their native masks.

    ``data``: an ``open_dataset`` result, or a folder opened with ``options``.
    """
    dataset = data if isinstance(data, Dataset) else open_dataset(Path(data), options or DataOptions())
    return {
        split: load_split(dataset, split, size_px, native=split != "train", cache_dir=cache_dir)
        for split in splits
    }


def cross_split_duplicates(data: dict[str, Split]) -> dict[str, list[tuple[str, str]]]:
    """``{"valid": [(valid name, train name), ...], "test": [...]}``: images identical (as arrays at
    the cached size) to a training image; test images are also checked against validation."""
    def digest(split: Split, i: int) -> bytes:
        return hashlib.sha1(np.ascontiguousarray(split.images[i]).tobytes()).digest()

    index = {name: {} for name in data}
    for name, split in data.items():
        for i in range(len(split)):
            index[name].setdefault(digest(split, i), split.file_names[i])
    out = {}
    for name, earlier in (("valid", ("train",)), ("test", ("train", "valid"))):
        if name not in data:
            continue
        split, pairs = data[name], []
        for i in range(len(split)):
            d = digest(split, i)
            match = next((index[e][d] for e in earlier if d in index.get(e, {})), None)
            if match is not None:
                pairs.append((split.file_names[i], match))
        out[name] = pairs
    return out


def report_duplicates(data: dict[str, Split], log=print) -> int:
    """Log how many valid/test images are identical to earlier splits' images; returns the count."""
    duplicates = cross_split_duplicates(data)
    count = sum(len(pairs) for pairs in duplicates.values())
    if count:
        parts = [f"{split} {len(pairs)} (e.g. {pairs[0][0]} = {pairs[0][1]})" for split, pairs in duplicates.items() if pairs]
        log(f"warning: {count} image(s) identical across splits: " + "; ".join(parts))
    return count


# ----------------------------------------------------------------------------- python -m tumorseg.data


def inspect(dataset: Dataset, size_px: int = 256, cache_dir: Path | None = None) -> dict:
    """The report of ``python -m tumorseg.data`` (``tumorseg.inspect_data``), as a JSON-able dict.
    Builds (or reuses) the cache at ``size_px`` to compare images across splits."""
    from tumorseg.inspect_data import summarize

    masks = {split: [sample_mask(dataset, s) for s in dataset.splits[split]] for split in SPLITS}
    arrays = load_dataset(dataset, size_px, cache_dir=cache_dir)
    return summarize(dataset, masks, cross_split_duplicates(arrays), size_px)


def main(argv=None) -> int:
    from tumorseg.cli import ArgumentParser, exit_on_user_error
    from tumorseg.inspect_data import report_lines

    p = ArgumentParser(prog="tumorseg.data", description="Describe a dataset folder (any layout) before training on it.")
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--size", type=int, default=256, help="cache size at which images are compared (default 256)")
    p.add_argument("--cache-dir", type=Path, default=None)
    add_data_arguments(p)
    args = p.parse_args(argv)
    with exit_on_user_error("tumorseg.data"):
        dataset = open_dataset(args.data, DataOptions.from_args(args))
        report = inspect(dataset, args.size, args.cache_dir)
    print(json.dumps(report, indent=1) if args.json else "\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
