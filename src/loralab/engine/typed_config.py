"""A small typed-config library: dataclass sections whose attribute docstrings are the documentation.

Nothing here knows loralab's schema. A *schema* is a root dataclass with scalar fields plus named
sections (``{"train": TrainConfig, ...}``, each a ``Section`` subclass). This module gives:

* ``coerce(value, type, key)``: YAML/CLI strings to the annotated type ("1e-8" -> 1e-08, "3" -> 3),
  lossy conversions refused (1.5 is not an int), errors naming the key, the value and the type;
* ``Section``: coerce every field on construction, then ``check()`` ranges; errors list every problem;
* ``set_key(tree, "train.lr", value, sections, root)``: a dotted override into a nested dict, an unknown
  key failing with the closest valid one ("did you mean 'train.lr'?");
* ``read_yaml(path)``: safe YAML that refuses duplicate keys; ``field_docs`` / ``help_text`` /
  ``yaml_with_docs``: the documentation, generated from the docstrings.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import sys
import textwrap
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, value out of range. The CLI exits 2 on it."""


_NONE_WORDS = ("None", "none", "null", "~")


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _has_type(value: Any, tp: Any) -> bool:
    base = typing.get_origin(tp) or tp
    if base is Literal:
        return value in typing.get_args(tp)
    return isinstance(base, type) and isinstance(value, base) and not (isinstance(value, bool) and base is not bool)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``, the value and the type.

    Strings from YAML or the command line are parsed where the type asks for it ("1e-8" -> float,
    "3" -> int, "true" -> bool); a comma-separated string fills a pure list field ("a,b").
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}{extra}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value in _NONE_WORDS):
            return None
        members = sorted((a for a in args if a is not type(None)), key=lambda a: not _has_type(value, a))
        for member in members:  # a value that already has a member type keeps it
            try:
                return coerce(value, member, key)
            except ConfigError:
                continue
        raise fail()
    if value is None:
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        by_lower = {str(a).lower(): a for a in args}
        close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
        raise fail(f"; did you mean {by_lower[close[0]]!r}?" if close else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        number = _finite_float(value)
        if number is not None and number == int(number):
            return int(number)  # 1e3 (a string to PyYAML) or 16.0
        raise fail()
    if tp is float:
        number = _finite_float(value)
        if number is None:
            raise fail(" (not finite)" if _is_nonfinite(value) else "")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = args
        if not isinstance(value, dict):
            raise fail()
        return {coerce(k, key_tp, key): coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in the schema, not user input


def _is_nonfinite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal right under each annotated attribute (MRO included)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def require(errors: list, ok: bool, name: str, msg: str) -> None:
    if not ok:
        errors.append((name, msg))


_MACHINERY = ("dataclasses.py", "copy.py", "typed_config.py", os.path.join("engine", "config.py"),
              os.path.join("engine", "runs.py"), os.path.join("engine", "runner.py"))
"""Reads from these files (building, copying, comparing, serialising a section) are not uses of a key."""


class Section:
    """Base of config sections: coerce every field on construction, then check ranges.

    ``Section.reads`` (a set, None by default) records ``"<KEY>.<field>"`` for every field read from
    outside the config machinery: the test that every key of the schema is live uses it."""

    KEY: ClassVar[str] = ""
    reads: ClassVar[set[str] | None] = None

    def __getattribute__(self, name: str) -> Any:
        if Section.reads is not None and not name.startswith("_"):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.endswith(_MACHINERY) and name in {f.name for f in fields(type(self))}:
                Section.reads.add(f"{type(self).KEY}.{name}")
        return object.__getattribute__(self, name)

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], self._key(f.name)))
        errors = [f"{self._key(name)}: {msg}" for name, msg in self.check()]
        if errors:
            raise ConfigError("\n".join(errors))

    def _key(self, name: str) -> str:
        return f"{self.KEY}.{name}" if self.KEY else name

    def check(self) -> list[tuple[str, str]]:
        """Range checks: (field, message) for each violation."""
        return []


def section_from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields, got {data!r}")
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise unknown_key(f"{prefix}.{key}", [f"{prefix}.{n}" for n in names])
    return cls(**data)


def closest(key: str, valid: list[str]) -> str | None:
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [v for v in valid if v.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


MOVED_KEYS: dict[str, str] = {}
"""Keys that existed once -> what to write instead (filled by the schema that retired them)."""


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    if key in MOVED_KEYS:
        return ConfigError(f"unknown key {key!r}: it was replaced; use {MOVED_KEYS[key]}")
    guess = closest(key, valid)
    hint = f"; did you mean {guess!r}?" if guess else "; valid keys: see `loralab config --schema`"
    return ConfigError(f"unknown key {key!r}{hint}")


def scalars_of(root: type, sections: dict[str, type]) -> list[str]:
    """The root's own (non-section) fields: ``root.SCALARS`` when it names them, else every other field."""
    return list(getattr(root, "SCALARS", None) or [f.name for f in fields(root) if f.name not in sections])


def keys_of(root: type, sections: dict[str, type]) -> list[str]:
    """Every dotted key of a schema: the root's scalar fields, then ``<section>.<field>``."""
    keys = scalars_of(root, sections)
    for section, cls in sections.items():
        keys += [f"{section}.{f.name}" for f in fields(cls)]
    return keys


def set_key(tree: dict, key: str, value: Any, source: str, root: type, sections: dict[str, type]) -> None:
    """Set dotted ``key`` in the nested ``tree``, checking the key and coercing ``value`` to its type."""
    parts = key.split(".")
    valid = keys_of(root, sections) + list(sections)
    if parts[0] in sections and len(parts) >= 2:
        cls, name, rest = sections[parts[0]], parts[1], parts[2:]
        hints = field_types(cls)
        if name not in {f.name for f in fields(cls)}:
            raise unknown_key(key, valid)
        section = tree.setdefault(parts[0], {})
        if rest:  # e.g. lora.rank_pattern.encoder.layer.0.query=4: a key inside a dict field
            if typing.get_origin(hints[name]) is not dict:
                raise unknown_key(key, valid)
            section[name] = dict(section.get(name) or {})
            section[name][".".join(rest)] = coerce(value, typing.get_args(hints[name])[1], f"{key} (from {source})")
            return
        section[name] = coerce(value, hints[name], f"{parts[0]}.{name} (from {source})")
        return
    if len(parts) != 1 or key not in set(scalars_of(root, sections)) | set(sections):
        raise unknown_key(key, valid)
    if key in sections:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (from {source}): expected a mapping of fields, got {value!r}")
        for sub, sub_value in value.items():
            set_key(tree, f"{key}.{sub}", sub_value, source, root, sections)
        return
    tree[key] = coerce(value, field_types(root)[key], f"{key} (from {source})")


def apply_layer(tree: dict, layer: Any, source: str, root: type, sections: dict[str, type]) -> None:
    """Apply a nested or dotted mapping (``{"train": {"lr": 1e-4}}`` or ``{"train.lr": 1e-4}``)."""
    if not isinstance(layer, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(layer).__name__}")
    for key, value in layer.items():
        try:
            set_key(tree, str(key), value, source, root, sections)
        except ConfigError as err:
            if str(err).startswith("unknown key"):  # say where the key was written
                raise ConfigError(f"{source}: {err}") from None
            raise


def is_text_field(key: str, root: type, sections: dict[str, type]) -> bool:
    parts = key.split(".")
    cls = sections.get(parts[0]) if len(parts) == 2 else root if len(parts) == 1 else None
    tp = field_types(cls).get(parts[-1]) if cls is not None else None
    return tp is str or (tp is not None and set(typing.get_args(tp)) == {str, type(None)})


def parse_override(item: str, text_field: Any = lambda key: False) -> tuple[str, Any]:
    """``"train.lr=4e-4"`` -> ("train.lr", "4e-4" parsed by YAML). Values are typed later by the field.

    Text fields (``text_field(key)`` true) take the text as typed (``data.system_prompt=You are: terse``),
    except that ``null``, ``~`` and an empty value mean None.
    """
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=4e-4)")
    if text_field(key):
        return key, None if raw.strip() in ("", "null", "~") else raw
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.__class__.__name__})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1} and "
                                  f"line {seen[key] + 1}); the second would silently replace the first")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``: missing file, bad encoding, bad YAML, duplicate keys and a
    non-mapping top level are ConfigErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_text(cls: type, prefix: str = "", only: tuple[str, ...] | None = None) -> str:
    """Every field of ``cls`` (or those named in ``only``): key, type, default and doc."""
    lines: list[str] = []
    docs, hints = field_docs(cls), field_types(cls)
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        lines.append(f"  {prefix}{f.name} ({type_name(hints[f.name])}, default {_default(f)!r})")
        lines += [f"      {line}" for line in docs.get(f.name, "(undocumented)").splitlines()]
    return "\n".join(lines)


def yaml_with_docs(values: dict, cls: type, indent: str = "") -> list[str]:
    """``values`` (a section's dict) as YAML lines, each field's doc as a comment above it."""
    docs = field_docs(cls)
    out: list[str] = []
    for name, value in values.items():
        out.extend(f"{indent}# {line}" for line in docs.get(name, "").splitlines())
        dumped = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
        out.append(f"{indent}{name}: {dumped.removesuffix('...').strip()}")
    return out
