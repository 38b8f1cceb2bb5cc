"""Loading YAML a user supplies (constraint profiles, search spaces, ``--param`` values) with bounds.

On top of PyYAML's safe loader (plain data only, no Python objects): files larger than
:data:`~automl_ad.defaults.YAML_MAX_BYTES` are not read; text must be UTF-8; anchors and aliases are allowed (merge
keys ``<<: *base`` work) but a document whose aliases expand to more than :data:`~automl_ad.defaults.YAML_MAX_VALUES`
values (a "billion laughs" bomb) or that refers to itself is refused before any Python object is built; ``.nan`` and
``.inf`` are refused with the key that holds them. Every failure is a :class:`~automl_ad.errors.ConfigError` naming
the source.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from automl_ad.defaults import YAML_MAX_BYTES, YAML_MAX_VALUES
from automl_ad.errors import ConfigError


def load_yaml_file(path: str | Path) -> Any:
    """The data in a user's YAML file (``None`` when it is empty)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(YAML_MAX_BYTES + 1)  # bounded even for endless files such as /dev/zero
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if len(data) > YAML_MAX_BYTES:
        raise ConfigError(f"{path}: is larger than {YAML_MAX_BYTES:,} bytes, far more than any automl-ad "
                          "configuration file needs; check that this is the right file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} "
                          "cannot be decoded); save it as UTF-8") from exc
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, source: str) -> Any:
    """The data in YAML ``text``; ``source`` names it in errors (a file, or e.g. ``--param k``)."""
    if len(text.encode("utf-8", "surrogatepass")) > YAML_MAX_BYTES:
        raise ConfigError(f"{source}: is larger than {YAML_MAX_BYTES:,} bytes, far more than any automl-ad "
                          "configuration needs")
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except _AliasError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: is nested too deeply to be a configuration; check its brackets and "
                          "indentation") from None
    for key, value in _numbers(data, ""):
        if not math.isfinite(value):
            where = f"'{key}'" if key else "the value"
            raise ConfigError(f"{source}: {where} is {value}, not a finite number; write a number "
                              "(or leave the key out to use the default)")
    return data


class _AliasError(yaml.YAMLError):
    """The document's aliases expand beyond the value limit, or a value contains itself."""


class _BoundedLoader(yaml.SafeLoader):
    """Safe loader that checks each composed document's expanded size before constructing it."""

    def compose_document(self) -> Node:
        node = super().compose_document()
        _check_expanded_size(node)
        return node


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_expanded_size(root: Node) -> None:
    """Count the values the document holds with every alias expanded (each shared node once per use), without
    expanding anything; iterative, so deep documents do not exhaust the stack."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        if children_counted:
            visiting.discard(id(node))
            sizes[id(node)] = min(YAML_MAX_VALUES + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
            if sizes[id(node)] > YAML_MAX_VALUES:
                line = node.start_mark.line + 1 if node.start_mark else "?"
                raise _AliasError(f"its aliases (*name) expand to more than {YAML_MAX_VALUES:,} values (the value "
                                f"starting at line {line}); this looks like an alias bomb. Write the values out, "
                                "or use fewer anchors (&name) and aliases")
        elif id(node) in visiting:
            line = node.start_mark.line + 1 if node.start_mark else "?"
            raise _AliasError(f"the value starting at line {line} contains an alias to itself; remove that alias")
        elif id(node) not in sizes:
            visiting.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _numbers(data: Any, key: str):
    """``(key path, float)`` for every float in ``data`` (keys joined with dots, list items as ``[i]``)."""
    if isinstance(data, float):
        yield key, data
    elif isinstance(data, dict):
        for name, value in data.items():
            yield from _numbers(value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _numbers(value, f"{key}[{index}]")
