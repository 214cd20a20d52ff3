"""Train/valid/test splits without leakage: carve the missing ones by case, read and write splits.json.

Where the data has no valid or test split, it is carved out of the training pool with
``--split TRAIN,VALID,TEST`` fractions (seeded), **by case**, so no patient is in two splits.
A sample's case is, in this order: the first capture group of ``--group-by REGEX`` applied to its
file stem (the whole match when the pattern has no group); its case folder (``DIR/CASE/x.png``) or
nnU-Net case id; else its file stem without a trailing ``_<digits>`` (``TCGA_CS_4941_19960909_12``
-> ``TCGA_CS_4941_19960909``). Cases are shuffled with the seed and each goes to the split
furthest below its share of images.

``splits.json`` is ``{"train": [...], "valid": [...], "test": [...]}`` with each sample's image
path relative to the dataset folder; ``--splits FILE`` reuses one (then every image must be in it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath

import numpy as np

from tumorseg.errors import ConfigError, DataError
from tumorseg.layouts import Sample

SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_GROUP_BY = r"^(.*?)(?:_\d+)?$"  # flat folders: the stem without a trailing _<digits>


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> fractions that are >= 0 and sum to 1 (ConfigError otherwise)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--split: expected TRAIN,VALID,TEST fractions, got {text!r}") from None
    check_fractions(values)
    return values


def check_fractions(values) -> None:
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(f"--split: expected three fractions >= 0 (train, valid, test), got {values}")
    if abs(sum(values) - 1) > 1e-6:
        raise ConfigError(f"--split {','.join(f'{v:g}' for v in values)}: fractions sum to {sum(values):g}, not 1")


def case_of(sample: Sample, group_by: re.Pattern | None) -> str:
    nnunet_case = sample.case is not None and sample.display_name == sample.case
    stem = sample.case if nnunet_case else PurePosixPath(sample.name).stem
    if group_by is not None:
        match = group_by.search(stem)
        value = None if match is None else (match.group(1) if group_by.groups else match.group(0))
        if not value:
            raise ConfigError(f"--group-by {group_by.pattern!r} does not match {sample.name} (stem {stem!r})")
        return value
    if sample.case is not None:
        return sample.case
    return re.match(DEFAULT_GROUP_BY, stem).group(1) or stem


def carve(
    pools: dict[str, list[Sample]], fractions=None, *, seed: int = 0, group_by: str | None = None
) -> tuple[dict[str, list[Sample]], bool]:
    """``({split: samples}, carved)``: the data's own splits, the missing ones carved by case
    (``fractions`` None: ``DEFAULT_FRACTIONS``, the user gave no ``--split``)."""
    flag = f"--split {','.join(f'{v:g}' for v in fractions)}" if fractions is not None else None
    fractions = DEFAULT_FRACTIONS if fractions is None else fractions
    check_fractions(tuple(fractions))
    pattern = None
    if group_by is not None:
        try:
            pattern = re.compile(group_by)
        except re.error as err:
            raise ConfigError(f"--group-by {group_by!r}: not a regular expression ({err})") from None
    if "all" not in pools and all(pools.get(s) for s in SPLITS):
        if pattern is not None:
            for samples in pools.values():
                for sample in samples:
                    case_of(sample, pattern)  # a pattern that matches nothing is still an error
        return {s: list(pools[s]) for s in SPLITS}, False
    source = "all" if "all" in pools else "train"
    pool = pools.get(source, [])
    targets = [s for s in SPLITS if s == "train" or not pools.get(s)]
    cases: dict[str, list[Sample]] = {}
    for sample in pool:
        cases.setdefault(case_of(sample, pattern), []).append(sample)
    order = sorted(cases)
    np.random.default_rng(seed).shuffle(order)
    weights = np.array([fractions[SPLITS.index(s)] for s in targets], float)
    want = weights / weights.sum() * len(pool) if weights.sum() > 0 else weights
    have = np.zeros(len(targets))
    out = {s: list(pools.get(s, [])) for s in SPLITS if s not in targets}
    out.update({s: [] for s in targets})
    for case in order:
        k = int(np.argmax(want - have))
        out[targets[k]].extend(cases[case])
        have[k] += len(cases[case])
    for split in SPLITS:
        if not out[split]:
            hint = ("pass --group-by REGEX if the file names tell more cases apart" if len(cases) < 3
                    else "pass --split with larger valid and test fractions")
            raise DataError(
                f"{flag or 'default split ' + ','.join(map(str, DEFAULT_FRACTIONS))}: the {split} split would be "
                f"empty ({len(pool)} image(s) in {len(cases)} case(s) to carve from); {hint}"
            )
    return {s: sorted(out[s], key=lambda x: x.name) for s in SPLITS}, True


def write_splits(path: Path, splits: dict[str, list[Sample]]) -> None:
    Path(path).write_text(json.dumps({s: [x.name for x in splits[s]] for s in SPLITS}, indent=1) + "\n")


def read_splits(path: Path, pools: dict[str, list[Sample]], root: Path) -> dict[str, list[Sample]]:
    """Every sample of ``pools`` placed where ``path`` (a splits.json) says."""
    path = Path(path)
    try:
        listed = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--splits: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--splits {path}: not valid JSON ({err})") from None
    if not isinstance(listed, dict) or set(listed) != set(SPLITS) or not all(isinstance(v, list) for v in listed.values()):
        raise ConfigError(f"--splits {path}: expected {{\"train\": [...], \"valid\": [...], \"test\": [...]}}")
    by_name = {sample.name: sample for samples in pools.values() for sample in samples}
    where: dict[str, str] = {}
    for split in SPLITS:
        for name in listed[split]:
            if name not in by_name:
                raise DataError(f"{path}: {name!r} ({split}) is not an image of {root}")
            if name in where:
                raise DataError(f"{path}: {name!r} is in both {where[name]} and {split}")
            where[name] = split
    for name in by_name:
        if name not in where:
            raise DataError(f"{root / name} is in no split of {path}")
    for split in SPLITS:
        if not listed[split]:
            raise DataError(f"{path}: the {split} split is empty")
    return {s: [by_name[n] for n in listed[s]] for s in SPLITS}
