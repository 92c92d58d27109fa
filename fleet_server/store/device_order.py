"""How ``GET /api/v1/devices`` may order and search the registry: the sort keys it takes, the SQL
each backend sorts by, and the range an id prefix covers. Shared by both store backends so they
answer the same page for the same request.

Every page is ordered by its sort key, then by id (the same direction), so paging through a sort is
stable. Labels are not a sort key: a device's labels are a mapping, which has no order of its own.
"""

from __future__ import annotations

import re

__all__ = ["DEVICE_SORTS", "ID_PREFIX_RE", "id_prefix_range", "order_by_sql"]

DEVICE_SORTS = ("id", "online", "sync_state", "release", "drift", "last_event", "last_seen")
"""The keys a device listing sorts by: the dashboard's device table columns except labels."""

ID_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
"""An id prefix is made of the characters a device id may hold."""

_ID_END = "~"  # sorts after every character a device id may hold (ASCII 0x7E > 'z')

_SQLITE = {
    "id": "devices.id",
    "online": "coalesce(devices.online, 0)",
    "sync_state": "devices.sync_state",
    "release": "devices.release",
    "drift": ("(CASE WHEN json_valid(devices.drift) AND json_type(devices.drift) = 'object'"
              " THEN coalesce(json_extract(devices.drift, '$.count'), 0) ELSE 0 END)"),
    "last_event": "devices.last_event_ts",
    "last_seen": "devices.last_seen",
}
_POSTGRESQL = {
    **_SQLITE,
    "drift": ("(CASE WHEN jsonb_typeof(devices.drift::jsonb -> 'count') = 'number'"
              " THEN (devices.drift::jsonb ->> 'count')::numeric ELSE 0 END)"),
}


def order_by_sql(backend: str, sort: str, descending: bool) -> str:
    """Return the ``ORDER BY`` clause (without the keywords) of a device listing sorted by ``sort``.

    Raises:
        ValueError: ``sort`` is not one of :data:`DEVICE_SORTS` or ``backend`` is unknown.
    """
    exprs = {"sqlite": _SQLITE, "postgresql": _POSTGRESQL}.get(backend)
    if exprs is None or sort not in exprs:
        raise ValueError(f"cannot sort devices by {sort!r} on {backend!r}")
    direction = "DESC" if descending else "ASC"
    # NULLs (never seen, no release yet) go last either way, as a reader expects of a sorted table
    if sort == "id":
        return f"devices.id {direction}"
    return f"{exprs[sort]} IS NULL, {exprs[sort]} {direction}, devices.id {direction}"


def id_prefix_range(prefix: str) -> tuple[str, str]:
    """Return ``(low, high)``: a device id starts with ``prefix`` exactly when ``low <= id < high``
    in byte order (so the id index answers the search).

    Raises:
        ValueError: ``prefix`` holds a character no device id may hold.
    """
    if not ID_PREFIX_RE.match(prefix):
        raise ValueError("an id prefix is 1-128 letters, digits, '.', '_' or '-'")
    return prefix, prefix + _ID_END
