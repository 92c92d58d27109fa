"""Size-capped, alias-free safe YAML loading that remembers the line of every value.

The config repo is untrusted input, so loading is deliberately narrow: one document, at most
``max_bytes``, no anchors or aliases (no expansion bombs), no merge keys, no duplicate keys and
only the plain YAML types (mapping, sequence, string, integer, float, boolean, null; a timestamp
stays the string it was written as). The result remembers where each value came from so that
``fleetctl lint`` can name a line for every problem.

Every YAML file the project reads goes through :func:`load_yaml`: config-repo bundles and
``fleet.yaml``, ``agent.yaml``, ``server.yaml`` and the values of ``fleet-server --set``. Nesting is
refused past 64 levels while the text is scanned, before any node is built, and an error never
echoes more than :data:`EXCERPT_CHARS` characters of a value (:func:`excerpt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from edge_core.errors import YamlError

__all__ = ["DEFAULT_MAX_BYTES", "EXCERPT_CHARS", "MAX_DEPTH", "LocatedDoc", "YamlSyntaxError", "excerpt",
           "load_yaml"]

DEFAULT_MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences a document may have."""
EXCERPT_CHARS = 60
"""Most characters of a value an error message shows."""
_START_EVENTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_END_EVENTS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
_NODE_EVENTS = (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)


class YamlSyntaxError(YamlError):
    """The text does not parse as YAML at all (as opposed to a refused feature or an over-cap size)."""


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Return ``text`` cut to its first ``limit`` characters, ``…`` marking a cut (for error messages)."""
    return text if len(text) <= limit else text[:limit] + "…"

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")
)
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"

Where = tuple[str | int, ...]


@dataclass(frozen=True)
class LocatedDoc:
    """A loaded YAML document: its plain ``value`` and the 1-based line of every node."""

    value: Any
    lines: Mapping[Where, int] = field(default_factory=dict)

    def line(self, where: Where) -> int:
        """Return the 1-based line of the deepest node that exists on the path ``where``.

        A mapping entry is located at its key, a list item at its first character; a path that
        leaves the document falls back to its longest existing prefix (the document itself: 1).
        """
        for n in range(len(where), -1, -1):
            found = self.lines.get(tuple(where[:n]))
            if found is not None:
                return found
        return 1


def _mark_line(mark: Any) -> int:
    return int(getattr(mark, "line", 0)) + 1


def load_yaml(data: bytes, *, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> LocatedDoc:
    """Parse one YAML document from ``data`` safely, remembering the line of every node.

    Args:
        data: the raw file bytes (UTF-8, UTF-16 with BOM is accepted by the parser too).
        name: the file name used in error messages (repo-relative for config-repo files).
        max_bytes: documents larger than this are refused before parsing.

    Raises:
        YamlError: over the cap, a syntax error, several documents, an anchor or alias, a merge
            key, a duplicate key, an unsupported tag or nesting deeper than 64 levels; ``line``
            says where.
    """
    if len(data) > max_bytes:
        raise YamlError(f"document is {len(data)} bytes, over the {max_bytes}-byte cap", 1, name)
    try:
        _refuse_aliases_and_streams(data, name)
        return _build(data, name)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = " ".join(" ".join(str(p).split()) for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise YamlSyntaxError(f"YAML syntax error: {excerpt(reason, 200)}", _mark_line(mark), name) from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML error: {excerpt(' '.join(str(exc).split()), 200)}", 1, name) from exc


def _refuse_aliases_and_streams(data: bytes, name: str) -> None:
    documents = 0
    depth = 0
    for event in yaml.parse(data, Loader=_Loader):
        if isinstance(event, _START_EVENTS):
            depth += 1
            if depth > MAX_DEPTH + 1:
                raise YamlError(f"document nests too deeply (more than {MAX_DEPTH} levels)",
                                _mark_line(event.start_mark), name)
        elif isinstance(event, _END_EVENTS):
            depth -= 1
        if isinstance(event, yaml.AliasEvent):
            raise YamlError("YAML aliases (*name) are not allowed", _mark_line(event.start_mark), name)
        if getattr(event, "anchor", None) is not None:
            raise YamlError("YAML anchors (&name) are not allowed", _mark_line(event.start_mark), name)
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise YamlError("only one YAML document is allowed per file",
                                _mark_line(event.start_mark), name)


class _Open:
    """A mapping or sequence whose end event has not come yet, and where its next value goes."""

    __slots__ = ("key", "value", "where")

    def __init__(self, value: dict[Any, Any] | list[Any], where: Where) -> None:
        self.value = value
        self.where = where
        self.key: Any = _NO_KEY  # a mapping's key whose value comes next


_NO_KEY = object()


def _build(data: bytes, name: str) -> LocatedDoc:
    """Build the plain value of the (one) document of ``data`` from the parser's events.

    The value is built while the events stream by, without composing the document's node graph
    first, so a large bundle costs little more memory than its value. Every node is checked in
    document order as it arrives: nesting, the tags, mapping keys (plain scalars, no merge key, no
    duplicate) and each scalar.
    """
    lines: dict[Where, int] = {}
    loader = _Loader("")
    stack: list[_Open] = []
    root: Any = _NO_KEY
    for event in yaml.parse(data, Loader=_Loader):
        if isinstance(event, _END_EVENTS):
            done = stack.pop()
            root = _place(stack, done.value, root)
            continue
        if not isinstance(event, _NODE_EVENTS):
            continue  # stream and document boundaries
        parent = stack[-1] if stack else None
        if parent is not None and isinstance(parent.value, dict) and parent.key is _NO_KEY:
            parent.key = _key(event, parent, lines, loader, name)
            continue
        if parent is None:
            where: Where = ()
        elif isinstance(parent.value, dict):
            where = (*parent.where, parent.key)
        else:
            where = (*parent.where, len(parent.value))
        line = _mark_line(event.start_mark)
        lines.setdefault(where, line)
        if len(stack) > MAX_DEPTH:
            raise YamlError("document nests too deeply", line, name)
        if isinstance(event, yaml.MappingStartEvent):
            _check_collection_tag(event, loader, yaml.MappingNode, _MAP_TAG, line=line, name=name)
            stack.append(_Open({}, where))
        elif isinstance(event, yaml.SequenceStartEvent):
            _check_collection_tag(event, loader, yaml.SequenceNode, _SEQ_TAG, line=line, name=name)
            stack.append(_Open([], where))
        else:
            root = _place(stack, _scalar(event, _scalar_tag(event, loader), loader, name), root)
    if root is _NO_KEY:
        return LocatedDoc(None, {(): 1})
    return LocatedDoc(root, lines)


def _place(stack: list[_Open], value: Any, root: Any) -> Any:
    """Put a finished ``value`` into the innermost open collection; return the document's root."""
    if not stack:
        return value
    parent = stack[-1]
    if isinstance(parent.value, dict):
        parent.value[parent.key] = value
        parent.key = _NO_KEY
    else:
        parent.value.append(value)
    return root


def _key(event: Any, parent: _Open, lines: dict[Where, int], loader: Any, name: str) -> Any:
    """Return the mapping key ``event`` stands for, refusing anything but a new plain scalar."""
    key_line = _mark_line(event.start_mark)
    if not isinstance(event, yaml.ScalarEvent):
        raise YamlError("mapping keys must be plain scalars", key_line, name)
    tag = _scalar_tag(event, loader)
    if tag == "tag:yaml.org,2002:merge":
        raise YamlError("YAML merge keys (<<) are not allowed", key_line, name)
    key = _scalar(event, tag, loader, name)
    assert isinstance(parent.value, dict)
    if key in parent.value:
        raise YamlError(f"duplicate key {excerpt(repr(key))}", key_line, name)
    lines[(*parent.where, key)] = key_line
    return key


def _check_collection_tag(event: Any, loader: Any, kind: type[Any], want: str, *, line: int,
                          name: str) -> None:
    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(kind, None, event.implicit)
    if tag != want:
        raise YamlError(f"unsupported YAML tag {excerpt(tag)}", line, name)


def _scalar_tag(event: Any, loader: Any) -> str:
    """The tag of a scalar event, resolved as the composer resolves it (plain ``5`` is an int)."""
    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    return str(tag)


def _scalar(event: Any, tag: str, loader: Any, name: str) -> Any:
    if tag == _TIMESTAMP_TAG:
        return str(event.value)
    if tag not in _PLAIN_SCALAR_TAGS:
        raise YamlError(f"unsupported YAML tag {excerpt(tag)}", _mark_line(event.start_mark), name)
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError) as exc:
        raise YamlError(f"bad scalar {excerpt(repr(event.value))}: {excerpt(str(exc))}",
                        _mark_line(event.start_mark), name) from exc
    finally:
        loader.constructed_objects.pop(node, None)
