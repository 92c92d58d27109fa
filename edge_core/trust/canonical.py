"""Canonical JSON: one byte string per value, so the same content always signs the same bytes.

Rules: UTF-8, object keys sorted by code point, no insignificant whitespace, no floats (integers,
strings, booleans, null, lists and objects only). Parsing refuses duplicate keys and non-finite
numbers, because two parsers disagreeing on a duplicate key is a classic signature bypass.
"""

from __future__ import annotations

import json
from typing import Any

from edge_core.errors import ManifestError

__all__ = ["canonical_bytes", "parse_strict_json"]


def _check(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise ManifestError("document nests too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        raise ManifestError("floats are not allowed in signed documents")
    if isinstance(value, list):
        for v in value:
            _check(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ManifestError("object keys must be strings")
            _check(v, depth + 1)
        return
    raise ManifestError(f"type {type(value).__name__} is not allowed in signed documents")


def canonical_bytes(value: Any) -> bytes:
    """Serialise ``value`` canonically (sorted keys, compact, UTF-8, no floats).

    Raises:
        ManifestError: the value holds a float or a type JSON cannot carry.
    """
    _check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ManifestError(f"non-finite number {name} is not allowed")


def _float_refused(text: str) -> Any:
    raise ManifestError(f"floats are not allowed in signed documents: {text}")


def parse_strict_json(data: bytes) -> Any:
    """Parse UTF-8 JSON refusing duplicate keys, NaN/Infinity and floats.

    Raises:
        ManifestError: not UTF-8, not JSON, duplicate keys, or a float anywhere.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError("document is not valid UTF-8") from exc
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=_float_refused)
    except ManifestError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"document is not valid JSON: {exc}") from exc
    _check(value)
    return value
