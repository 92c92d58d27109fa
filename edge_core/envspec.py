"""The ``env:`` mapping of a ``command`` resource or health check: validated names and values (pure).

Commands and command health checks run with a clean environment (see :mod:`edge_agent.runner`);
``env:`` adds variables to it. Names match ``[A-Z_][A-Z0-9_]*`` and must not start with
``EDGE_FLEET_`` (the agent's own variables); values are strings without NUL bytes. One mapping
holds at most :data:`ENV_MAX_VARS` variables and :data:`ENV_MAX_BYTES` bytes of names and values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from edge_core.errors import BundleError

__all__ = ["ENV_MAX_BYTES", "ENV_MAX_VARS", "ENV_NAME", "RESERVED_ENV_PREFIX", "parse_env"]

ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
ENV_MAX_VARS = 64
ENV_MAX_BYTES = 16 * 1024
RESERVED_ENV_PREFIX = "EDGE_FLEET_"


def parse_env(value: object, where: tuple[str | int, ...]) -> tuple[tuple[str, str], ...]:
    """Validate an ``env:`` value (``None``: no variables); return ``(name, value)`` pairs sorted by name.

    Raises:
        BundleError: not a mapping, too many or too large, a bad name, a reserved name, a non-string
            value or one with a NUL byte.
    """
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise BundleError("'env' must be a mapping of variable names to strings", where)
    if len(value) > ENV_MAX_VARS:
        raise BundleError(f"'env' has more than {ENV_MAX_VARS} variables", where)
    out: list[tuple[str, str]] = []
    for key, text in value.items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise BundleError(f"invalid variable name {key!r} (must match {ENV_NAME.pattern})", where)
        if key.startswith(RESERVED_ENV_PREFIX):
            raise BundleError(f"variable {key!r}: names starting with {RESERVED_ENV_PREFIX} are set by the "
                              "agent", (*where, key))
        if not isinstance(text, str) or "\x00" in text:
            raise BundleError(f"variable {key!r} must be a string without NUL bytes", (*where, key))
        out.append((key, text))
    if sum(len(k) + len(v.encode("utf-8")) for k, v in out) > ENV_MAX_BYTES:
        raise BundleError(f"'env' is larger than {ENV_MAX_BYTES} bytes", where)
    return tuple(sorted(out))
