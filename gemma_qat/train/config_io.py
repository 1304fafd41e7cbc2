"""Typed config plumbing shared by every run-config schema: nested frozen dataclasses built from a
TOML file plus dotted `key=value` overrides, with one clear error per mistake.

The schema is the dataclass tree itself (see `train/config.py`); this file knows nothing about
training. Errors name the full dotted key, so `optimizer.lrr=1` says which level had which keys.

A file may start from another: `base = "other.toml"` (top level, a path relative to the file) loads
that first and lays this file's keys over it, so presets share one base and state only what
differs. `to_toml` writes the resolved config back as one self-contained file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

try:  # Python 3.11+ ships tomllib; 3.10 needs the backport (declared in pyproject for <3.11).
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

T = TypeVar("T")
_NO_RENAMES: Mapping[str, str] = types.MappingProxyType({})
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _hints(cls) -> dict[str, Any]:
    # Resolves the string annotations that `from __future__ import annotations` leaves behind.
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """A value from TOML (already typed) or from an override string (`from_text`) into `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # An integer literal is a fine float (`lr = 1`); a bool is not.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has unsupported type {tp!r}")
    raise ValueError(f"config key {key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _from_text(text: str, tp, key: str) -> Any:
    """An override's right-hand side, parsed according to the field's declared type."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if type(None) in typing.get_args(tp) and text.lower() in ("none", "null"):
        return None
    for a in args:
        if a is bool and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        if a is int:
            try:
                return int(text)
            except ValueError:
                pass
        if a is float:
            try:
                return float(text)
            except ValueError:
                pass
        if a is str:
            return text
    raise ValueError(f"config key {key} expects {' | '.join(_type_name(a) for a in args)}, got {text!r}")


def _known(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _renamed_error(key: str, renamed: Mapping[str, str]) -> None:
    if key in renamed:
        raise ValueError(f"config key {key!r} was renamed {renamed[key]!r}; set {renamed[key]} instead")


def upgrade(data: Mapping, renamed: Mapping[str, str]) -> dict:
    """A config saved by an older version (config.json beside a run, a checkpoint's copy) with each
    renamed dotted key moved to its new name; a file a person edits gets an error instead (`build`)."""
    out = merge(data, {})
    for old, new in renamed.items():
        *path, last = old.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        value = node.pop(last)
        *new_path, new_last = new.split(".")
        target = out
        for part in new_path:
            target = target.setdefault(part, {})
        target.setdefault(new_last, value)
    return out


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "", renamed: Mapping[str, str] = _NO_RENAMES) -> T:
    """Nested dict → nested dataclass, checking every key and value type. `renamed`: old dotted key →
    new one, for an error that names the new key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config key {prefix.rstrip('.') or '<root>'} must be a table, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + k
        if k not in names:
            _renamed_error(key, renamed)
            level = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ValueError(f"unknown config key {key!r}; known keys at {level}: {_known(cls)}")
        tp = hints[k]
        kwargs[k] = build(tp, v, key + ".", renamed) if dataclasses.is_dataclass(tp) else _coerce(v, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, cls, dotted: str, text: str, renamed: Mapping[str, str]) -> None:
    parts = dotted.split(".")
    node, node_cls, walked = tree, cls, ""
    for i, part in enumerate(parts):
        hints = _hints(node_cls)
        if part not in hints:
            _renamed_error(dotted, renamed)
            level = f"[{walked}]" if walked else "the top level"
            raise ValueError(f"unknown config key {dotted!r}; known keys at {level}: {_known(node_cls)}")
        tp = hints[part]
        walked = f"{walked}.{part}" if walked else part
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"config key {dotted!r} is a table; set one of its keys: {_known(tp)}")
            node[part] = _from_text(text, tp, dotted)
        else:
            if not dataclasses.is_dataclass(tp):
                raise ValueError(f"config key {walked!r} is a {_type_name(tp)}, not a table (in {dotted!r})")
            node = node.setdefault(part, {})
            node_cls = tp


def parse_overrides(cls, overrides: Sequence[str], renamed: Mapping[str, str] = _NO_RENAMES) -> dict:
    """['optimizer.lr=1e-3', 'mesh.fsdp=4'] → nested dict of typed values."""
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=3e-4)")
        _set_dotted(tree, cls, key.strip(), text.strip(), renamed)
    return tree


def merge(base: Mapping, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_file(path: str | Path) -> dict:
    """A TOML (or JSON, e.g. the config saved beside a checkpoint) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {e}") from None


BASE_KEY = "base"


def read_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """`read_file` with the file's `base` chain resolved: base keys first, this file's keys on top
    (tables merge key by key)."""
    path = Path(path)
    data = read_file(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"config file {path}: `{BASE_KEY}` must be a file name relative to it, got {base!r}")
    seen = (*_seen, path.resolve())
    base_path = path.parent / base
    if base_path.resolve() in seen:
        cycle = " → ".join(str(p) for p in (*seen, base_path.resolve()))
        raise ValueError(f"config file {path}: `{BASE_KEY}` chain is a cycle: {cycle}")
    if not base_path.is_file():
        raise FileNotFoundError(f"config file {base_path} (the {BASE_KEY} of {path}) does not exist")
    return merge(read_tree(base_path, seen), data)


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
         renamed: Mapping[str, str] = _NO_RENAMES) -> T:
    """Defaults ← file (and its bases) ← overrides, validated into `cls`. A JSON file is a saved
    config, whose renamed keys are upgraded; in TOML and overrides an old key is an error."""
    data = read_tree(path) if path is not None else {}
    if path is not None and Path(path).suffix == ".json":
        data = upgrade(data, renamed)
    return build(cls, merge(data, parse_overrides(cls, overrides, renamed)), renamed=renamed)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr round-trips floats; TOML spells inf and nan as Python does
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"no TOML spelling for {value!r}")


def to_toml(obj, header: Sequence[str] = ()) -> str:
    """Every key of the config dataclass `obj` as TOML that loads back (`build`) to an equal object.
    TOML has no null: a None is written as a comment and loads back as the field's default, so
    that default must be None."""
    lines = [f"# {h}" if h else "#" for h in header]

    def table(node, name: str) -> None:
        fields = dataclasses.fields(node)
        if name:
            lines.extend(["", f"[{name}]"])
        for f in fields:
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                continue
            if value is None:
                if f.default is not None:
                    raise ValueError(f"config key {name + '.' if name else ''}{f.name} is None but defaults to "
                                     f"{f.default!r}; TOML cannot say None")
                lines.append(f"# {f.name} = (none)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for f in fields:  # tables after every plain key of this level, as TOML requires
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                table(value, f"{name}.{f.name}" if name else f.name)

    table(obj, "")
    return "\n".join(lines) + "\n"
