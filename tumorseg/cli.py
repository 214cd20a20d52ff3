"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_int_list(text: str) -> list[int]:
    """``"96,128"`` -> ``[96, 128]`` (for argparse ``type=``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_range(text: str) -> tuple[float, float]:
    """``"1e-5,3e-3"`` -> ``(1e-05, 0.003)`` (for argparse ``type=``)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high
