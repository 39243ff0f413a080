"""Command-line flags generated from a config dataclass, so a CLI never re-lists a config's fields by hand.

    add_flags(parser, SlowFastConfig)                 # --fps, --max-frames, --token-budget, ..., --slowfast/--no-...
    cfg = SlowFastConfig(**given(args, SlowFastConfig))

A field ``max_frames`` becomes ``--max-frames`` (``rename`` maps a field to another flag name); its type comes from the
annotation (``int``, ``float``, ``str``, ``Path``, ``bool`` as ``--x/--no-x``, ``X | None`` as ``X``, ``list[X]`` as ``--x A B``); every flag defaults
to None, so `given` returns only what the user set and the config's own defaults (or a model's) apply to the rest.
Light: dataclasses and argparse only, for commands that must start fast (``keye frames``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from pathlib import Path

__all__ = ["add_flags", "given"]

_TYPES = {int: int, float: float, str: str, Path: Path}


def _flag_type(annotation) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) is not list:  # X | None
        annotation = args[0]
    return annotation


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    rename: dict[str, str] | None = None,
    help: dict[str, str] | None = None,
    show_defaults: bool = True,
) -> None:
    """One flag per field of dataclass ``cls`` (``only`` these fields, when given). ``show_defaults=False`` where the
    values in force come from elsewhere (a model's settings), not from ``cls()``."""
    hints = typing.get_type_hints(cls)
    names = None if only is None else set(only)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        flag = "--" + (rename or {}).get(f.name, f.name).replace("_", "-")
        kind = _flag_type(hints[f.name])
        text = (help or {}).get(f.name, f"{cls.__name__}.{f.name}")
        if show_defaults:
            text = f"{text} (default: {getattr(defaults, f.name)})"
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif kind in _TYPES:
            parser.add_argument(flag, dest=f.name, type=_TYPES[kind], default=None, help=text)
        elif typing.get_origin(kind) is list and typing.get_args(kind)[0] in _TYPES:
            item = _TYPES[typing.get_args(kind)[0]]
            parser.add_argument(flag, dest=f.name, type=item, nargs="+", default=None, help=text)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line flag for type {kind!r}")


def given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` the user set on the command line (flags made by `add_flags`)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
