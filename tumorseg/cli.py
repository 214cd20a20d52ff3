"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import contextlib
import os
import sys

from tumorseg.errors import UserError

# albumentations checks PyPI for updates at import time; never phone home from a training job.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@contextlib.contextmanager
def exit_on_user_error(prog: str):
    """Turn a ``UserError`` into ``prog: error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_int_list(text: str) -> list[int]:
    """``"96,128"`` -> ``[96, 128]`` (for argparse ``type=``)."""
    import argparse

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values
