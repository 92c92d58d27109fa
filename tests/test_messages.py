"""The shared MQTT message schemas: topics, builders, the wire format and every decode refusal."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_core import messages as m
from edge_core.errors import MessageError, UntrustedInputError

TS = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _all_messages() -> dict[str, dict[str, Any]]:
    return {
        "status": m.status_message("dev-1", commit=COMMIT, release=7, sync_state="applied",
                                   drift={"count": 2, "resources": ["file:/etc/a"]}, paused=False, ts=TS),
        "events": m.event_message("dev-1", type="sync_failed", commit=COMMIT, release=7, ts=TS,
                                  reason="health check web failed", step="health",
                                  detail={"changes": 3, "nested": {"anything": [1, 2]}}),
        "health": m.health_message("dev-1", commit=None, release=None, ts=TS,
                                   metrics={"cpu_percent": 3.5, "disk": {"/": 40.0}},
                                   checks=[{"name": "web", "ok": True, "bundle": "base", "kind": "http",
                                            "detail": "200", "duration": 0.01}]),
        "online": m.online_message("dev-1", True, TS),
        "desired": m.desired_message("dev-1", revision=COMMIT, release=8, rollout_id="r-42", ts=TS),
        "nudge": m.nudge_message(revision=COMMIT, release=8, ts=TS),
    }


def test_topics() -> None:
    assert m.topic("fleet/v1", "dev-1", "status") == "fleet/v1/dev-1/status"
    assert m.nudge_topic("fleet/v1") == "fleet/v1/_broadcast/nudge"
    assert m.parse_topic("fleet/v1", "fleet/v1/dev-1/health") == ("dev-1", "health")
    assert m.parse_topic("fleet/v1", "fleet/v1/_broadcast/nudge") == (None, "nudge")
    for bad in ("fleet/v2/dev-1/status", "fleet/v1/dev-1/other", "fleet/v1/dev-1/status/x",
                "fleet/v1/_broadcast/status", "fleet/v1/-dev/status"):
        assert m.parse_topic("fleet/v1", bad) is None, bad
    for device in ("a/b", "a+", "a#", "", "-lead", "x" * 65, ".hidden"):
        with pytest.raises(MessageError) as info:
            m.topic("fleet/v1", device, "status")
        assert info.value.reason == "bad_field"
    with pytest.raises(MessageError):
        m.topic("fleet/v1", "dev-1", "secrets")
    with pytest.raises(MessageError):
        m.nudge_topic("fleet/#")
    assert m.DEVICE_ID_RE.match("A" + "b" * 63)


def test_round_trip_every_kind() -> None:
    for kind, msg in _all_messages().items():
        wire = m.encode(msg)
        assert b" " not in wire.replace(b"health check web failed", b"")
        device = None if kind == "nudge" else "dev-1"
        assert m.decode(kind, wire, topic_device=device) == msg
        assert msg["schema"] == m.SCHEMA_VERSION
        assert msg["ts"] == "2024-05-01T12:00:00.123Z"
        if kind != "nudge":
            assert msg["device"] == "dev-1"


def test_timestamps() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert m.format_ts(datetime(2024, 1, 1, 2, 0, tzinfo=plus_two)) == "2024-01-01T00:00:00.000Z"
    assert m.format_ts(0.5) == "1970-01-01T00:00:00.500Z"
    for bad in (datetime(2024, 1, 1), float("nan"), True, "now"):
        with pytest.raises(MessageError):
            m.format_ts(bad)  # type: ignore[arg-type]


def test_builders_refuse_bad_values() -> None:
    with pytest.raises(MessageError):
        m.event_message("dev-1", type="sync_exploded", commit=None, release=None, ts=TS)
    with pytest.raises(MessageError):
        m.status_message("dev-1", commit="not-a-commit", release=1, sync_state="applied", drift={},
                         paused=False, ts=TS)
    with pytest.raises(MessageError):
        m.desired_message("dev-1", revision=COMMIT, release=-1, rollout_id=None, ts=TS)
    with pytest.raises(MessageError):
        m.health_message("dev-1", commit=None, release=None, ts=TS, metrics={},
                         checks=[{"name": "x"}])
    with pytest.raises(MessageError):
        m.encode({"x": float("inf")})
    for event_type in m.EVENT_TYPES:
        m.event_message("dev-1", type=event_type, commit=None, release=None, ts=TS)


def _refusal(kind: str, payload: bytes, topic_device: str | None = "dev-1", **kw: Any) -> str:
    with pytest.raises(MessageError) as info:
        m.decode(kind, payload, topic_device=topic_device, **kw)
    assert isinstance(info.value, UntrustedInputError)
    assert info.value.reason in str(info.value)
    return info.value.reason


def _mutated(kind: str, **changes: Any) -> bytes:
    msg = dict(_all_messages()[kind])
    for key, value in changes.items():
        if value is _DROP:
            del msg[key]
        else:
            msg[key] = value
    return json.dumps(msg).encode()


_DROP = object()


def test_decode_refusals() -> None:
    good = m.encode(_all_messages()["status"])
    # the size cap comes first, even before JSON parsing
    assert _refusal("status", b"{" * 70_000) == "oversized"
    assert _refusal("status", good, max_bytes=len(good) - 1) == "oversized"
    m.decode("status", good, topic_device="dev-1", max_bytes=len(good))
    for payload in (b"", b"not json", b"\xff\xfe", b"[1,2]", b"42", b'"text"', b'{"schema": NaN}',
                    b'{"schema":1,"schema":1}', good[:-1]):
        assert _refusal("status", payload) == "malformed_json", payload
    assert _refusal("status", _mutated("status", schema=2)) == "bad_schema"
    assert _refusal("status", _mutated("status", schema="1")) == "bad_schema"
    assert _refusal("status", _mutated("status", schema=_DROP)) == "bad_schema"
    assert _refusal("status", _mutated("status", schema=True)) == "bad_schema"
    # spoofing: the device in the payload must be the device of the topic
    assert _refusal("status", good, topic_device="dev-2") == "spoofed"
    assert _refusal("desired", m.encode(_all_messages()["desired"]), topic_device="dev-2") == "spoofed"
    bad_fields = [
        ("status", {"device": "a/b"}), ("status", {"device": _DROP}), ("status", {"extra": 1}),
        ("status", {"paused": "no"}), ("status", {"release": True}), ("status", {"release": 1.5}),
        ("status", {"drift": []}), ("status", {"sync_state": "Applied!"}), ("status", {"ts": "yesterday"}),
        ("status", {"ts": "2024-13-01T00:00:00Z"}), ("status", {"ts": "2024-05-01T12:00:00+02:00"}),
        ("status", {"commit": "XYZ"}), ("status", {"commit": _DROP}),
        ("events", {"type": "nope"}), ("events", {"detail": [1]}), ("events", {"reason": 5}),
        ("events", {"reason": "x" * 5000}),
        ("health", {"checks": [{"name": "a", "ok": "yes"}]}), ("health", {"checks": [{"ok": True}]}),
        ("health", {"checks": [{"name": "a", "ok": True, "secret": "x"}]}), ("health", {"metrics": 3}),
        ("online", {"online": 1}), ("online", {"commit": COMMIT}),
        ("desired", {"revision": None}), ("desired", {"rollout_id": 3}), ("desired", {"release": None}),
        ("nudge", {"device": "dev-1"}), ("nudge", {"revision": "zz"}),
    ]
    for kind, changes in bad_fields:
        device = None if kind == "nudge" else "dev-1"
        payload = _mutated(kind, **changes)  # type: ignore[arg-type]
        assert _refusal(kind, payload, topic_device=device) == "bad_field", (kind, changes)
    assert _refusal("bogus", good) == "bad_field"


def test_topic_device_none_skips_the_spoof_check_only() -> None:
    msg = _all_messages()["events"]
    assert m.decode("events", m.encode(msg), topic_device=None) == msg
    assert _refusal("events", _mutated("events", device="no/slash"), topic_device=None) == "bad_field"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _fuzzed(kind: str) -> st.SearchStrategy[bytes]:
    """Valid messages of ``kind`` with one field replaced, dropped or added, or raw bytes."""
    base = _all_messages()[kind]
    field = st.sampled_from([*sorted(base), "extra", "schema", "device"])
    replaced = st.builds(lambda k, v: json.dumps({**base, k: v}, default=str).encode(), field, _json_values)
    dropped = field.map(lambda k: json.dumps({x: y for x, y in base.items() if x != k}).encode())
    return st.one_of(replaced, dropped, st.binary(max_size=200),
                     _json_values.map(lambda v: json.dumps(v, default=str).encode()))


@settings(max_examples=3000, deadline=None)
@given(kind=st.sampled_from(sorted(_all_messages())), data=st.data())
def test_fuzzed_payloads_are_decoded_or_refused_with_a_reason(kind: str, data: st.DataObject) -> None:
    """Thousands of mutated and random payloads: decode returns a message or raises MessageError."""
    payload = data.draw(_fuzzed(kind))
    device = None if kind == "nudge" else "dev-1"
    reason = None
    try:
        msg = m.decode(kind, payload, topic_device=device)
    except MessageError as exc:
        reason = exc.reason
    if reason is None:
        assert msg["schema"] == m.SCHEMA_VERSION
    else:
        assert reason in {"oversized", "malformed_json", "bad_schema", "spoofed", "bad_field"}


def _labelled_status(**kw: Any) -> dict[str, Any]:
    return m.status_message("dev-1", commit=COMMIT, release=7, sync_state="in_sync", drift={}, paused=False,
                            ts=TS, **kw)


def test_status_labels_and_profile_round_trip() -> None:
    labels = {"site": "berlin", "canary": "true", "team/owner": "ops", "empty": ""}
    msg = _labelled_status(labels=labels, profile="rpi4")
    assert (msg["labels"], msg["profile"]) == (labels, "rpi4")
    assert m.decode("status", m.encode(msg), topic_device="dev-1") == msg
    # both are optional: None leaves them out (an older agent's status stays valid) ...
    plain = _labelled_status()
    assert "labels" not in plain
    assert "profile" not in plain
    assert m.decode("status", m.encode(plain), topic_device="dev-1") == plain
    # ... while an empty mapping says "no labels"
    assert _labelled_status(labels={})["labels"] == {}
    most = {f"k{i}": "v" * m.MAX_LABEL_VALUE for i in range(m.MAX_LABELS)}
    assert m.decode("status", m.encode(_labelled_status(labels=most)), topic_device="dev-1")["labels"] == most
    assert m.validate_labels(labels) == labels


def test_status_refuses_bad_labels_and_profiles() -> None:
    too_many = {f"k{i}": "v" for i in range(m.MAX_LABELS + 1)}
    bad_labels: list[Any] = [
        None, [], "site=berlin", {"site": 1}, {"site": None}, {"site": True}, {"site": ["a"]},
        {"site": {"x": "y"}}, {"": "x"}, {"has space": "x"}, {"k:v": "x"}, {"k" * 129: "x"},
        {"site": "v" * (m.MAX_LABEL_VALUE + 1)}, too_many,
    ]
    for labels in bad_labels:
        assert _refusal("status", _mutated("status", labels=labels)) == "bad_field", labels
        if isinstance(labels, dict):
            with pytest.raises(MessageError):
                _labelled_status(labels=labels)
        with pytest.raises(MessageError) as info:
            m.validate_labels(labels)
        assert info.value.reason == "bad_field"
    for profile in (None, "", 3, "a/b", "x" * 65, "with space", ["rpi4"]):
        assert _refusal("status", _mutated("status", profile=profile)) == "bad_field", profile
    with pytest.raises(MessageError):
        _labelled_status(profile="no/slash")
    # the optional fields belong to the status only
    assert _refusal("health", _mutated("health", labels={"site": "a"})) == "bad_field"
    assert _refusal("events", _mutated("events", profile="rpi4")) == "bad_field"
