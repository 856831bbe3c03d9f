"""YAML <-> typed dataclass configuration with dotted command-line overrides.

A section present in the YAML (or named by an override) is built from its
keys plus the section class's own field defaults; it is not merged with a
default instance, because derived defaults (``ffn_hidden_size = 4 *
hidden_size``) would go stale.

Strictness is the point: an unknown key, a value of the wrong type or a
malformed override is an error that names the file and the dotted key, so a
typo in a 1000-GPU launch fails in the first second instead of silently
running the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..atomic_io import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the source and the dotted key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ``where`` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 in YAML parses as a float
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "6e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)}")


def _build(cls: type[T], data: dict, where: str) -> T:
    """``where`` is ``source:dotted.path`` of this section (``source:`` at the top level)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    join = "" if where.endswith(":") else "."
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}{join}{unknown[0]}: unknown key in section {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(value, hints[name], f"{where}{join}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} {cls.__name__}: {exc}") from exc


def from_dict(cls: type[T], data: dict, source: str = "") -> T:
    """Build ``cls`` from a plain mapping; ``source`` (a file name) prefixes error messages."""
    return _build(cls, data, f"{source or cls.__name__}:")


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping.

    Only the syntax is checked here; unknown keys are caught when the
    dataclasses are built, with the override named as the source.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty component in key {key!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_mapping(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, resolving ``base: other.yaml`` (relative to the file) first.

    The file's own keys are deep-merged over its base's, so a paper run config
    can be ``base: ../models/xl.yaml`` plus the three keys that differ.
    """
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: base files form a cycle: {cycle}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as exc:
        where = f" (base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"{path}: config file not found{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for item in bases:
        if not isinstance(item, str):
            raise ConfigError(f"{path}:base: expected a file name or a list of them, got {item!r}")
        merged = _deep_merge(merged, load_yaml_mapping(path.parent / item, (*_chain, path.resolve())))
    return _deep_merge(merged, data)


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides."""
    data = load_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return from_dict(cls, data, source)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temporary file, then rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``CONFIG.yaml [dotted.key=value ...]`` positionals of every command that reads a run config
    (read them back with ``load_config(TrainConfig, args.config, args.overrides)``)."""
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.train_steps=100")
