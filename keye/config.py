"""Typed configs from YAML with dotted overrides: the one loader of every entry point.

    cfg = load(EvalConfig, "configs/eval/synthetic-tiny.yaml", ["limit=20", "compress=dyntok"])

A YAML file names fields of a dataclass (nested dataclasses are sections); what it does not name keeps the default.
Unknown keys, in the file or in an override, are a `ConfigError` naming the key and the file; values are checked
against the field's type. Training configs add their recipe check on top (`keye.training.config.load_config`);
command-line flags come from the same dataclasses (`keye.flags`). Light: yaml and dataclasses only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from keye.errors import ConfigError

__all__ = ["build_config", "load", "read_config"]


def _check(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to ``tp`` (dataclasses built from dicts, ints accepted as floats), or a ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(where, f"expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, f"expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_check(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_check(k, k_tp, where): _check(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(where, f"expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(where, f"unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"{p!r} is not a section")
    node[parts[-1]] = value


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[dict, str]:
    """The mapping a YAML file holds (None: empty) with ``key.sub=value`` overrides applied (values parsed as YAML),
    and the name errors should give for it."""
    data: dict = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(source, f"cannot read config: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(source, "a config file must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data, source


def build_config(cls: type, data: dict, source: str = "<config>") -> Any:
    """Dataclass ``cls`` from a mapping, every value type-checked; errors name ``source`` and the key."""
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(source, e.args[0]) from e


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """``cls`` from a YAML file (None: defaults) with dotted ``overrides``."""
    return build_config(cls, *read_config(path, overrides))
