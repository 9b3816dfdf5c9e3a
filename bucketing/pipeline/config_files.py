"""Reading a dataset config file safely: TOML or YAML text into plain data and the line of
every key, or a :class:`ConfigError` naming the file, the key and the line.

Bounded in every dimension a hostile file could stretch: at most ``MAX_CONFIG_BYTES``; one
YAML pass (libyaml's ``CSafeLoader``, the pure-Python ``SafeLoader`` where libyaml is
missing) whose node tree is walked once, with alias expansion bounded by ``MAX_YAML_NODES``
(an alias bomb is refused, not expanded) and recursive aliases refused; duplicate YAML keys
refused; nesting deeper than ``MAX_DEPTH`` refused before any parser recurses; a linear
line lookup for TOML keys (no backtracking regular expression); and only string keys,
finite numbers and integers that fit int64 in the result.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # nodes after alias expansion
MAX_DEPTH = 32  # nested tables and arrays
INT64 = (-(2**63), 2**63 - 1)
YAML_SUFFIXES = (".yaml", ".yml")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BARE_KEY = re.compile(r"[A-Za-z0-9_\-\"'. ]+")


class ConfigError(ValueError):
    """A config file problem, naming the file, the key and the line."""


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """The parsed file (a table of keys) and ``{"datasets[1].captions.dropout": line}``;
    YAML for a ``.yaml`` / ``.yml`` file, else TOML."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a config file is at most "
                              f"{MAX_CONFIG_BYTES} bytes (1 MiB)")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error})") from error
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: a config file is at most {MAX_CONFIG_BYTES} bytes (1 MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error})") from error
    _check_flow_depth(text, path)
    if path.suffix.lower() in YAML_SUFFIXES:
        raw, lines = _read_yaml(text, path)
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from error
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read") from None
        lines = toml_key_lines(text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file is a table of keys, got {type(raw).__name__}")
    check_values(raw, path, lines)
    return raw, lines


def line_of(lines: Mapping[str, int], key: str) -> int | None:
    """The line of ``key``, else of the nearest enclosing key that has one (a key inside an
    inline table: the table's line)."""
    while key:
        if key in lines:
            return lines[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return None


def _where(path: Path, key: str, lines: Mapping[str, int]) -> str:
    line = line_of(lines, key)
    return f"{path}:{line}" if line else str(path)


def check_values(raw: Any, path: Path, lines: Mapping[str, int]) -> None:
    """Refuse what no config key can hold: nesting deeper than ``MAX_DEPTH``, keys that are
    not strings, ``inf``/``nan``, integers beyond int64 (iterative: never a RecursionError)."""
    stack: list[tuple[str, Any, int]] = [("", raw, 0)]
    while stack:
        key, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{_where(path, key, lines)}: {key}: nested deeper than "
                              f"{MAX_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{_where(path, key, lines)}: {key or '(top)'}: key "
                                      f"{k!r} is not a string (quote it)")
                stack.append((f"{key}.{k}" if key else k, v, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v, depth + 1) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_where(path, key, lines)}: {key}: {value} is not a finite "
                              "number")
        elif isinstance(value, int) and not isinstance(value, bool) and \
                not INT64[0] <= value <= INT64[1]:
            raise ConfigError(f"{_where(path, key, lines)}: {key}: {value} is out of range "
                              "(beyond a 64-bit integer)")


def _check_flow_depth(text: str, path: Path) -> None:
    """Refuse brackets nested deeper than ``MAX_DEPTH`` (outside quotes and comments) before
    a parser recurses into them; one linear pass."""
    depth = line = 0
    quote = ""
    comment = escaped = False
    for ch in text:
        if ch == "\n":  # a comment or a quote (an apostrophe in plain text) ends here
            line += 1
            comment = escaped = False
            quote = ""
            continue
        if comment:
            continue
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "#":
            comment = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{path}:{line + 1}: nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth = max(0, depth - 1)


def _read_yaml(text: str, path: Path) -> tuple[Any, dict[str, int]]:
    """One parse: the node tree walked once (lines, duplicate keys, alias expansion), then
    the values constructed from it."""
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines = _yaml_walk(node, path)
        return loader.construct_document(node), lines
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    finally:
        loader.dispose()


def _yaml_walk(root: yaml.Node, path: Path) -> dict[str, int]:
    """Key paths -> 1-based lines, counting every node as expanded through aliases (at most
    ``MAX_YAML_NODES``); refuses recursive aliases, duplicate keys and non-scalar keys."""
    lines: dict[str, int] = {}
    seen = 0
    stack: list[tuple[str, yaml.Node, tuple[int, ...]]] = [("", root, ())]
    while stack:
        prefix, node, ancestors = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ConfigError(f"{path}: more than {MAX_YAML_NODES} values once aliases are "
                              "expanded (an alias bomb?)")
        if id(node) in ancestors:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: {prefix}: a recursive "
                              "alias (a value containing itself)")
        if len(ancestors) > MAX_DEPTH:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: {prefix}: nested deeper "
                              f"than {MAX_DEPTH} levels")
        inner = (*ancestors, id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if not isinstance(key, yaml.ScalarNode):
                    raise ConfigError(f"{path}:{line}: {prefix or '(top)'}: a key must be a "
                                      "plain string")
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                if key.value in keys and key.value != "<<":
                    raise ConfigError(f"{path}:{line}: {name}: duplicate key (first on line "
                                      f"{keys[key.value]})")
                keys[key.value] = line
                lines.setdefault(name, line)
                stack.append((name, value, inner))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault(f"{prefix}[{i}]", item.start_mark.line + 1)
                stack.append((f"{prefix}[{i}]", item, inner))
    return lines


def toml_key_lines(text: str) -> dict[str, int]:
    """``"datasets[1].captions.dropout"``-style key paths of a TOML text -> 1-based line
    numbers (tables, arrays of tables and ``key =`` lines; enough to point at a mistake).
    Linear in the text: string methods only."""
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s.startswith("["):
            double = s.startswith("[[")
            body = s[2:] if double else s[1:]
            end = body.find("]")
            if end < 0:
                continue
            name = ".".join(p.strip().strip("\"'") for p in body[:end].split("."))
            parts = name.split(".")
            if double:
                counts[name] = counts.get(name, -1) + 1
                table = f"{name}[{counts[name]}]"
            else:  # a sub-table of the latest array entry, e.g. [datasets.captions]
                head = parts[0]
                table = f"{head}[{counts[head]}]" if head in counts else head
                table = ".".join([table, *parts[1:]])
            lines.setdefault(table, number)
            continue
        key, eq, _ = s.partition("=")
        key = key.strip()
        if eq and key and not key.startswith("#") and _BARE_KEY.fullmatch(key):
            name = ".".join(p.strip().strip("\"'") for p in key.split("."))
            lines.setdefault(f"{table}.{name}" if table else name, number)
    return lines
