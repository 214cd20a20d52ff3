"""Warnings that save a wasted run: settings that are legal but almost certainly not what was meant.

Each check returns ``warning: ...`` lines (empty when all is well); the CLIs print them to stderr
and carry on. Errors (settings that cannot work) are ``tumorseg.errors`` instead.
"""

from __future__ import annotations

import sys
from typing import Iterable

from tumorseg.data import Split


def warmup_warnings(warmup_epochs: int, epochs: int) -> list[str]:
    if warmup_epochs <= 0 or warmup_epochs < epochs:
        return []
    return [f"warning: --warmup-epochs {warmup_epochs} >= --epochs {epochs}: the whole run trains below the "
            f"recipe's lr (the warmup never ends); lower --warmup-epochs or raise --epochs"]


def data_warnings(train: Split, sizes_px: Iterable[int], batch_size: int, resize_flag: str = "--resize") -> list[str]:
    """The train split against the sizes it is resized to and the batch size."""
    lines = []
    native_h, native_w = train.native_hw
    above = sorted(size for size in set(sizes_px) if size > min(native_h, native_w))
    if above:
        lines.append(f"warning: {resize_flag} {','.join(map(str, above))} is above the images' native size "
                     f"{native_h}x{native_w}: upsampling costs compute and adds no detail")
    if len(train) < batch_size:
        lines.append(f"warning: the train split has {len(train)} image(s), fewer than --batch-size {batch_size}: "
                     f"every epoch is a single short batch; lower --batch-size or add data")
    return lines


def print_warnings(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)
