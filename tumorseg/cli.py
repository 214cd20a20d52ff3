"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Iterable

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
    """argparse, but a usage error is one line (``prog: error: ...``) and exit status 2, and no
    abbreviated flags (``--resize`` must not silently mean ``--resize-choices``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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


def parse_float_list(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (for argparse ``type=``)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def parse_range(text: str) -> tuple[float, float]:
    """``"1e-5,3e-3"`` -> ``(1e-05, 0.003)`` (for argparse ``type=``)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def add_dataclass_arguments(
    parser_or_group,
    cls,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """Add one flag per field of dataclass ``cls`` to a parser or argument group; returns the field names.

    Each flag's ``dest`` is the field name, so ``vars(args)`` feeds ``cls(**...)`` directly. From the field:

    - name: ``--`` + the field name with ``-`` for ``_``, unless ``metadata["flag"]`` names it
      (``resize_px`` -> ``--resize``);
    - type: the annotation (``int``, ``float``, ``str``, any one-argument class such as ``Path``;
      ``X | None`` means ``X`` with default None), or ``metadata["type"]`` (e.g. ``parse_int_list``);
      a ``bool`` field becomes a ``--name/--no-name`` pair (``argparse.BooleanOptionalAction``);
    - choices: ``metadata["choices"]``;
    - help: ``metadata["help"]`` followed by ``(default: ...)``.

    ``include`` (names, in any order) limits the fields, ``exclude`` drops some, and ``defaults``
    replaces the dataclass defaults of some fields (e.g. a driver's own defaults). An unknown name in
    any of the three raises ``ValueError`` (a typo would otherwise pass silently).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    include = list(fields) if include is None else list(include)
    exclude, defaults = set(exclude), dict(defaults or {})
    unknown = sorted((set(include) | exclude | set(defaults)) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    added = []
    for name in (n for n in fields if n in include and n not in exclude):
        f = fields[name]
        default = defaults.get(name, _field_default(f))
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: %(default)s)" if "%(default)" not in help_text else help_text
        kwargs: dict[str, Any] = {"dest": name, "default": default}
        value_type = f.metadata.get("type") or _flag_type(hints[name], cls, name)
        if value_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = value_type
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"])
        action = parser_or_group.add_argument(f.metadata.get("flag", "--" + name.replace("_", "-")), **kwargs)
        action.help = help_text  # set after: some Python versions' BooleanOptionalAction append a default
        added.append(name)
    return added


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flag_type(hint, cls, name: str):
    """The argparse ``type`` for annotation ``hint``: the hint itself, or ``X`` for ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            hint = options[0]
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint
    raise TypeError(f"{cls.__name__}.{name}: no flag type for {hint!r}; give metadata['type']")
