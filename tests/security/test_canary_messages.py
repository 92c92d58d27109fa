"""The fleet baseline message: schema-versioned and strictly validated like every other message."""

from __future__ import annotations

import json

import pytest

from edge_core import messages as m
from edge_core.errors import MessageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_the_baseline_topic_and_round_trip() -> None:
    assert m.baseline_topic("fleet/v1") == "fleet/v1/_broadcast/baseline"
    assert m.parse_topic("fleet/v1", "fleet/v1/_broadcast/baseline") == (None, m.BASELINE_KIND)
    msg = m.baseline_message(revision=COMMIT, release=3, ts=1_700_000_000.0)
    assert msg == {"schema": m.SCHEMA_VERSION, "ts": "2023-11-14T22:13:20.000Z", "revision": COMMIT,
                   "release": 3}
    assert m.decode(m.BASELINE_KIND, m.encode(msg), topic_device=None) == msg
    with pytest.raises(MessageError):
        m.baseline_topic("fleet/#")


@pytest.mark.parametrize(("change", "reason"), [
    ({"schema": 2}, "bad_schema"),
    ({"device": "dev-1"}, "bad_field"),          # fleet-wide: no device
    ({"rollout_id": "r-1"}, "bad_field"),        # unknown field
    ({"revision": "HEAD"}, "bad_field"),
    ({"revision": "../../x"}, "bad_field"),
    ({"release": -1}, "bad_field"),
    ({"release": True}, "bad_field"),
    ({"release": 2**63}, "bad_field"),
    ({"ts": "yesterday"}, "bad_field"),
])
def test_a_bad_baseline_is_refused(change: dict[str, object], reason: str) -> None:
    doc = {**m.baseline_message(revision=COMMIT, release=3, ts=1.0), **change}
    with pytest.raises(MessageError) as info:
        m.decode(m.BASELINE_KIND, json.dumps(doc).encode(), topic_device=None)
    assert info.value.reason == reason


def test_a_missing_field_or_oversized_payload_is_refused() -> None:
    doc = m.baseline_message(revision=COMMIT, release=3, ts=1.0)
    del doc["release"]
    with pytest.raises(MessageError) as info:
        m.decode(m.BASELINE_KIND, json.dumps(doc).encode(), topic_device=None)
    assert info.value.reason == "bad_field"
    with pytest.raises(MessageError) as big:
        m.decode(m.BASELINE_KIND, b" " * (m.MAX_MESSAGE_BYTES + 1), topic_device=None)
    assert big.value.reason == "oversized"
