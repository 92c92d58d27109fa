"""The MQTT message schemas both sides share: topics, builders, strict decoding. Pure, no I/O.

Topics (``prefix`` defaults to ``fleet/v1``)::

    <prefix>/<device>/status     device → server, retained    sync state, release, drift summary,
                                                              labels and profile (optional)
    <prefix>/<device>/events     device → server, QoS 1       one thing that happened
    <prefix>/<device>/health     device → server              metrics and health-check results
    <prefix>/<device>/online     device → server, retained    true on connect; the last will says false
    <prefix>/<device>/desired    server → device, retained    the revision the device should run
    <prefix>/<device>/control    server → device, retained    remote pause: stop applying, or go on
    <prefix>/<device>/preflight  server → device, retained    plan this release, apply nothing
    <prefix>/<device>/plan       device → server, QoS 1       what a preflight found
    <prefix>/_broadcast/nudge    server → all devices         a new release: fetch now
    <prefix>/_broadcast/baseline  server → all devices,        the fleet baseline: the last-good
                                 retained                     release a device without its own
                                                              assignment runs

Every payload is a compact JSON object with ``schema`` (:data:`SCHEMA_VERSION`), ``ts`` (RFC 3339,
UTC, ``Z``) and, except the two broadcasts, ``device``. Device reports carry the ``commit`` and
``release`` they concern (``null`` before the first release); ``desired``, ``baseline`` and ``nudge``
carry the ``revision`` (a commit) and ``release`` to run. The ``status`` may also carry the device's
``labels`` (at most :data:`MAX_LABELS`, keys matching :data:`LABEL_KEY_RE`, values strings of at most
:data:`MAX_LABEL_VALUE` characters) and ``profile`` (matching :data:`PROFILE_RE`); both are optional,
so a status from an agent that does not send them stays valid. While its last sync failed, a status
may carry ``repeat_count`` (how many syncs in a row ended with that same failure for that same
commit, an integer from 1) and ``last_seen`` (when the last of them ended, RFC 3339); both are
optional too, so older agents and servers agree. A paused device's status may say why
(``pause_reason``: its own pause, the fleet server's, or both). ``control`` carries ``paused`` and
the operator's ``reason``: the fleet server's remote pause of one device.

:func:`decode` is what a receiver calls on untrusted bytes: the size cap is checked first, then
JSON, the schema version, the device id against the topic's device (spoofing), and every field's
presence and type. Unknown top-level fields are refused; free-form content is allowed only inside
``detail`` (events), ``metrics`` (health) and ``drift`` (status). Each refusal raises
:class:`MessageError` with a stable ``reason`` code that the server counts by.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from edge_core.errors import MessageError

__all__ = [
    "BASELINE_KIND",
    "DEVICE_ID_RE",
    "DEVICE_KINDS",
    "EVENT_TYPES",
    "KINDS",
    "LABEL_KEY_RE",
    "MAX_LABELS",
    "MAX_LABEL_VALUE",
    "MAX_MESSAGE_BYTES",
    "NUDGE_KIND",
    "PLAN_OUTCOMES",
    "PROFILE_RE",
    "SCHEMA_VERSION",
    "baseline_message",
    "baseline_topic",
    "control_message",
    "decode",
    "desired_message",
    "encode",
    "event_message",
    "format_ts",
    "health_message",
    "nudge_message",
    "nudge_topic",
    "online_message",
    "parse_topic",
    "status_message",
    "topic",
    "validate",
    "validate_device_id",
    "validate_labels",
]

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A device id: also its MQTT user name, client id and topic level, so no ``/``, ``+`` or ``#``."""

MAX_LABELS = 64
"""The most labels a ``status`` may carry."""

LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")
"""A label name (the same rule as ``labels`` in ``agent.yaml``)."""

MAX_LABEL_VALUE = 256
"""The longest label value, in characters."""

PROFILE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
"""A device profile name (the same rule as ``profile`` in ``agent.yaml``)."""

DEVICE_KINDS = ("status", "events", "health", "online", "desired", "control", "preflight", "plan")
"""The per-device topic kinds, ``<prefix>/<device>/<kind>``."""

NUDGE_KIND = "nudge"
BASELINE_KIND = "baseline"
"""The kind of the retained fleet baseline, published on ``<prefix>/_broadcast/baseline``."""
KINDS = (*DEVICE_KINDS, NUDGE_KIND, BASELINE_KIND)
"""Every kind :func:`decode` understands."""

PLAN_OUTCOMES = ("change", "nochange", "refused")
"""What a device's preflight plan says: it would change something, nothing, or refuse the release."""

EVENT_TYPES = (
    "sync_started",
    "sync_succeeded",
    "sync_failed",
    "sync_refused",
    "sync_rolled_back",
    "drift_detected",
    "drift_corrected",
    "paused",
    "resumed",
)

_BROADCAST = "_broadcast"
_COMMIT_RE = re.compile(r"^[0-9a-f]{7,64}$")
_TOKEN_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|\+00:00)$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_MAX_TEXT = 2048
_MAX_ID = 128

# --- topics --------------------------------------------------------------------------------------


def _check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise MessageError("bad_field", f"topic prefix {prefix!r} is not topic levels of [A-Za-z0-9._-]")
    return prefix


def validate_device_id(device: object) -> str:
    """Return ``device`` if it matches :data:`DEVICE_ID_RE`.

    Raises:
        MessageError: ``bad_field`` when it is not a valid device id.
    """
    if not isinstance(device, str) or not DEVICE_ID_RE.match(device):
        raise MessageError("bad_field", f"invalid device id {device!r}")
    return device


def topic(prefix: str, device_id: str, kind: str) -> str:
    """Return ``<prefix>/<device_id>/<kind>`` for one of :data:`DEVICE_KINDS`.

    Raises:
        MessageError: ``bad_field`` for an invalid prefix, device id or kind.
    """
    if kind not in DEVICE_KINDS:
        raise MessageError("bad_field", f"unknown topic kind {kind!r}")
    return f"{_check_prefix(prefix)}/{validate_device_id(device_id)}/{kind}"


def nudge_topic(prefix: str) -> str:
    """Return the broadcast nudge topic ``<prefix>/_broadcast/nudge``.

    Raises:
        MessageError: ``bad_field`` for an invalid prefix.
    """
    return f"{_check_prefix(prefix)}/{_BROADCAST}/{NUDGE_KIND}"


def baseline_topic(prefix: str) -> str:
    """Return the retained fleet baseline topic ``<prefix>/_broadcast/baseline``.

    Raises:
        MessageError: ``bad_field`` for an invalid prefix.
    """
    return f"{_check_prefix(prefix)}/{_BROADCAST}/{BASELINE_KIND}"


def parse_topic(prefix: str, topic_name: str) -> tuple[str | None, str] | None:
    """Split a topic under ``prefix`` into ``(device, kind)``; the nudge gives ``(None, "nudge")``
    and the fleet baseline ``(None, "baseline")``.

    Returns ``None`` for a topic outside the prefix, with an invalid device id or an unknown kind.
    """
    head = prefix + "/"
    if not topic_name.startswith(head):
        return None
    parts = topic_name[len(head):].split("/")
    if len(parts) != 2:
        return None
    device, kind = parts
    if device == _BROADCAST:
        if kind == NUDGE_KIND:
            return None, NUDGE_KIND
        return (None, BASELINE_KIND) if kind == BASELINE_KIND else None
    if kind not in DEVICE_KINDS or not DEVICE_ID_RE.match(device):
        return None
    return device, kind


# --- time ----------------------------------------------------------------------------------------


def format_ts(ts: datetime | float) -> str:
    """Return ``ts`` (an aware datetime or POSIX seconds) as RFC 3339 UTC with milliseconds and ``Z``.

    Raises:
        MessageError: ``bad_field`` for a naive datetime or a non-finite number.
    """
    if isinstance(ts, datetime):
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise MessageError("bad_field", "timestamp must be timezone-aware")
        moment = ts.astimezone(UTC)
    elif isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
        moment = datetime.fromtimestamp(ts, UTC)
    else:
        raise MessageError("bad_field", f"invalid timestamp {ts!r}")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --- field checks --------------------------------------------------------------------------------

_Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    """An integer that fits SQLite's signed 64 bits (the store would refuse anything larger)."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _text(v: Any, limit: int = _MAX_TEXT) -> bool:
    return isinstance(v, str) and len(v) <= limit


def _opt(check: _Check) -> _Check:
    return lambda v: v is None or check(v)


def _commit(v: Any) -> bool:
    return isinstance(v, str) and bool(_COMMIT_RE.match(v))


def _release(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _repeat_count(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _ts(v: Any) -> bool:
    if not isinstance(v, str) or not _TS_RE.match(v):
        return False
    try:
        datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _object(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def _token(v: Any) -> bool:
    return isinstance(v, str) and bool(_TOKEN_RE.match(v))


_CHECK_FIELDS: dict[str, _Check] = {
    "name": lambda v: _text(v, 256) and v != "",
    "ok": lambda v: isinstance(v, bool),
    "bundle": lambda v: _text(v, 256),
    "kind": lambda v: _text(v, 64),
    "detail": _text,
    "duration": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v >= 0,
}


def _labels(v: Any) -> bool:
    if not isinstance(v, dict) or len(v) > MAX_LABELS:
        return False
    return all(isinstance(k, str) and LABEL_KEY_RE.match(k) and isinstance(value, str)
               and len(value) <= MAX_LABEL_VALUE for k, value in v.items())


def _profile(v: Any) -> bool:
    return isinstance(v, str) and bool(PROFILE_RE.match(v))


def validate_labels(labels: object) -> dict[str, str]:
    """Return ``labels`` as a plain dict if it is a valid ``labels`` field of a status.

    Valid: a mapping of at most :data:`MAX_LABELS` entries, every key matching :data:`LABEL_KEY_RE`
    and every value a string of at most :data:`MAX_LABEL_VALUE` characters.

    Raises:
        MessageError: ``bad_field`` when it is not.
    """
    plain = dict(labels) if isinstance(labels, Mapping) else None
    if plain is None or not _labels(plain):
        raise MessageError("bad_field", f"invalid labels: at most {MAX_LABELS} of name (1-128 characters of"
                                        f" A-Z a-z 0-9 . _ / -) to a string of at most {MAX_LABEL_VALUE}")
    return plain


def _count(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= 1_000_000


def _counts(v: Any) -> bool:
    return (isinstance(v, dict) and len(v) <= 64
            and all(isinstance(k, str) and _TOKEN_RE.match(k) and _count(n) for k, n in v.items()))


def _checks(v: Any) -> bool:
    if not isinstance(v, list) or len(v) > 256:
        return False
    for item in v:
        if not isinstance(item, dict) or "name" not in item or "ok" not in item:
            return False
        for key, value in item.items():
            check = _CHECK_FIELDS.get(key)
            if check is None or not check(value):
                return False
    return True


# kind -> field -> check; every field listed is required (nullable ones accept None).
# _OPTIONAL lists the fields a message of a kind may leave out (checked when present).
_COMMON: dict[str, _Check] = {"schema": _is_int, "ts": _ts}
_DEVICE: dict[str, _Check] = {**_COMMON, "device": lambda v: isinstance(v, str)}
_CONCERNS: dict[str, _Check] = {"commit": _opt(_commit), "release": _opt(_release)}
_SCHEMAS: dict[str, dict[str, _Check]] = {
    "status": {**_DEVICE, **_CONCERNS, "sync_state": _token, "drift": _object,
               "paused": lambda v: isinstance(v, bool)},
    "events": {**_DEVICE, **_CONCERNS, "type": lambda v: v in EVENT_TYPES, "reason": _opt(_text),
               "step": _opt(lambda v: _text(v, 64)), "detail": _opt(_object)},
    "health": {**_DEVICE, **_CONCERNS, "metrics": _object, "checks": _checks},
    "online": {**_DEVICE, "online": lambda v: isinstance(v, bool)},
    "desired": {**_DEVICE, "revision": _commit, "release": _release,
                "rollout_id": _opt(lambda v: _text(v, _MAX_ID))},
    "control": {**_DEVICE, "paused": lambda v: isinstance(v, bool), "reason": _opt(lambda v: _text(v, 500))},
    "preflight": {**_DEVICE, "revision": _commit, "release": _release,
                  "rollout_id": lambda v: _text(v, _MAX_ID)},
    "plan": {**_DEVICE, **_CONCERNS, "rollout_id": lambda v: _text(v, _MAX_ID),
             "outcome": lambda v: v in PLAN_OUTCOMES, "changes": _counts, "prune": _count, "drift": _count,
             "reason": _opt(_text)},
    "nudge": {**_COMMON, "revision": _commit, "release": _release},
    "baseline": {**_COMMON, "revision": _commit, "release": _release},
}
_OPTIONAL: dict[str, dict[str, _Check]] = {
    "status": {"labels": _labels, "profile": _profile, "repeat_count": _repeat_count, "last_seen": _ts,
               "pause_reason": lambda v: _text(v, 1100)},
}


_ALLOWED: dict[str, frozenset[str]] = {kind: frozenset(schema) | frozenset(_OPTIONAL.get(kind, {}))
                                       for kind, schema in _SCHEMAS.items()}


def validate(kind: str, msg: dict[str, Any], *, topic_device: str | None = None) -> dict[str, Any]:
    """Check a decoded message of ``kind`` field by field and return it.

    Raises:
        MessageError: ``bad_schema`` (missing or unsupported schema version), ``spoofed`` (the
            device differs from ``topic_device``) or ``bad_field`` (unknown kind, a missing, unknown
            or mistyped field, an invalid device id).
    """
    schema = _SCHEMAS.get(kind)
    if schema is None:
        raise MessageError("bad_field", f"unknown message kind {kind!r}")
    version = msg.get("schema")
    if not _is_int(version) or version != SCHEMA_VERSION:
        raise MessageError("bad_schema", f"unsupported schema version {version!r}")
    if "device" in schema:
        device = validate_device_id(msg.get("device"))
        if topic_device is not None and device != topic_device:
            raise MessageError("spoofed", f"device {device!r} published under {topic_device!r}")
    optional = _OPTIONAL.get(kind, {})
    if not _ALLOWED[kind].issuperset(msg):
        unknown = sorted(set(msg) - _ALLOWED[kind])
        raise MessageError("bad_field", f"unknown field(s) in {kind}: {', '.join(unknown)}")
    for name, check in schema.items():
        if name not in msg:
            raise MessageError("bad_field", f"{kind}: missing field {name!r}")
        if not check(msg[name]):
            raise MessageError("bad_field", f"{kind}: invalid value for {name!r}")
    for name, check in optional.items():
        if name in msg and not check(msg[name]):
            raise MessageError("bad_field", f"{kind}: invalid value for {name!r}")
    return msg


# --- builders ------------------------------------------------------------------------------------


def _base(device: str | None, ts: datetime | float) -> dict[str, Any]:
    msg: dict[str, Any] = {"schema": SCHEMA_VERSION, "ts": format_ts(ts)}
    if device is not None:
        msg["device"] = device
    return msg


def status_message(device: str, *, commit: str | None, release: int | None, sync_state: str,
                   drift: dict[str, Any], paused: bool, ts: datetime | float,
                   labels: Mapping[str, str] | None = None, profile: str | None = None,
                   repeat_count: int | None = None, last_seen: datetime | float | None = None,
                   pause_reason: str | None = None) -> dict[str, Any]:
    """Build the retained ``status`` message: what the device runs and how its last sync went.

    ``labels`` and ``profile`` are the device's own (from its ``agent.yaml``); each is left out of
    the message when None. An empty mapping is sent as ``{}``: the device has no labels.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    msg: dict[str, Any] = {**_base(device, ts), "commit": commit, "release": release,
                           "sync_state": sync_state, "drift": dict(drift), "paused": paused}
    if labels is not None:
        msg["labels"] = dict(labels)
    if profile is not None:
        msg["profile"] = profile
    if repeat_count is not None:
        msg["repeat_count"] = repeat_count
    if last_seen is not None:
        msg["last_seen"] = format_ts(last_seen)
    if pause_reason is not None:
        msg["pause_reason"] = pause_reason
    return validate("status", msg)


def event_message(device: str, *, type: str, commit: str | None, release: int | None,
                  ts: datetime | float, reason: str | None = None, step: str | None = None,
                  detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build one ``events`` message; ``type`` is one of :data:`EVENT_TYPES`.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    msg = {**_base(device, ts), "type": type, "commit": commit, "release": release, "reason": reason,
           "step": step, "detail": None if detail is None else dict(detail)}
    return validate("events", msg)


def health_message(device: str, *, commit: str | None, release: int | None, ts: datetime | float,
                   metrics: dict[str, Any], checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Build one ``health`` message: device metrics and the results of the health checks.

    Each check is a dict with ``name`` (str) and ``ok`` (bool) and optionally ``bundle``, ``kind``,
    ``detail`` (str) and ``duration`` (seconds).

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    msg = {**_base(device, ts), "commit": commit, "release": release, "metrics": dict(metrics),
           "checks": [dict(c) for c in checks]}
    return validate("health", msg)


def online_message(device: str, online: bool, ts: datetime | float) -> dict[str, Any]:
    """Build the retained ``online`` message (also the last will, with ``online=False``).

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return validate("online", {**_base(device, ts), "online": online})


def desired_message(device: str, *, revision: str, release: int, rollout_id: str | None,
                    ts: datetime | float) -> dict[str, Any]:
    """Build the retained ``desired`` message the server assigns to one device.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    msg = {**_base(device, ts), "revision": revision, "release": release, "rollout_id": rollout_id}
    return validate("desired", msg)


def control_message(device: str, *, paused: bool, reason: str | None, ts: datetime | float) -> dict[str, Any]:
    """Build the retained ``control`` message the server sends one device: ``paused`` true stops it
    applying changes (the operator's ``reason`` with it), false lets it go on (see docs/mqtt.md).

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return validate("control", {**_base(device, ts), "paused": paused, "reason": reason})


def nudge_message(*, revision: str, release: int, ts: datetime | float) -> dict[str, Any]:
    """Build the broadcast ``nudge``: a new release exists, fetch now.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return validate("nudge", {**_base(None, ts), "revision": revision, "release": release})


def baseline_message(*, revision: str, release: int, ts: datetime | float) -> dict[str, Any]:
    """Build the retained fleet ``baseline``: the last-good release a device without its own
    assignment runs (see docs/rollouts.md).

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return validate(BASELINE_KIND, {**_base(None, ts), "revision": revision, "release": release})


# --- wire format ---------------------------------------------------------------------------------


def encode(msg: dict[str, Any]) -> bytes:
    """Return ``msg`` as compact UTF-8 JSON with sorted keys.

    Raises:
        MessageError: ``bad_field`` when it is not JSON-serialisable (or holds NaN/Infinity).
    """
    try:
        text = json.dumps(msg, separators=(",", ":"), sort_keys=True, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise MessageError("bad_field", f"message is not JSON-serialisable: {exc}") from exc
    return text.encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the key to name it
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every message: json.loads with hooks would build a new one per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def decode(kind: str, payload: bytes, *, topic_device: str | None,
           max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse and strictly validate one received message of ``kind`` (see the module docstring).

    ``topic_device`` is the device named by the topic the message arrived on (``None`` when there
    is none, as for the nudge); the message's ``device`` must equal it.

    Raises:
        MessageError: ``oversized`` (over ``max_bytes``, checked before anything else),
            ``malformed_json`` (not UTF-8 JSON, duplicate keys, NaN, not an object), ``bad_schema``,
            ``spoofed`` or ``bad_field``.
    """
    if len(payload) > max_bytes:
        raise MessageError("oversized", f"{len(payload)} bytes is over the cap of {max_bytes}")
    try:
        doc = _DECODER.decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError("malformed_json", f"{kind} payload is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MessageError("malformed_json", f"{kind} payload is not a JSON object")
    return validate(kind, doc, topic_device=topic_device)
