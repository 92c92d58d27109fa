"""Release manifests: building, signing, co-signing, canonical bytes and structural refusals."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from edge_core.errors import ManifestError, PathError
from edge_core.trust.canonical import canonical_bytes, parse_strict_json
from edge_core.trust.keys import format_verify_key
from edge_core.trust.manifest import MANIFEST_PATH, file_digest, parse_release_fields
from fleet_server.authoring.manifest import (
    add_signatures,
    build_release,
    build_root,
    read_unverified,
    sign_document,
)

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
FILES = {"fleet.yaml": b"interval: 60\n", "bundles/web/bundle.yaml": b"name: web\n"}


def _release(**overrides: object) -> dict[str, object]:
    args: dict[str, object] = {"version": 3, "rollback_floor": 2, "created": NOW,
                               "expires": NOW + timedelta(days=30)}
    args.update(overrides)
    return build_release(FILES, **args)  # type: ignore[arg-type]


def test_file_digest_is_sha256_and_size() -> None:
    assert file_digest(b"abc") == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3)


def test_build_release_lists_every_file_with_digest_and_size() -> None:
    signed = _release(message="first")
    assert signed["type"] == "edge-fleet/release"
    assert signed["spec_version"] == 1
    assert signed["version"] == 3
    assert signed["rollback_floor"] == 2
    assert signed["created"] == "2030-01-01T12:00:00Z"
    assert signed["expires"] == "2030-01-31T12:00:00Z"
    assert signed["message"] == "first"
    expected = {path: {"sha256": file_digest(d)[0], "size": len(d)} for path, d in FILES.items()}
    assert signed["files"] == expected


def test_build_release_omits_message_when_none() -> None:
    assert "message" not in _release()


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a\x00b", "a//b", "./a", ".git/config"])
def test_build_release_refuses_unsafe_paths(bad: str) -> None:
    with pytest.raises(PathError):
        build_release({bad: b"x"}, version=1, rollback_floor=1, created=NOW, expires=NOW + timedelta(1))


def test_build_release_refuses_listing_the_manifest_itself() -> None:
    with pytest.raises(ManifestError):
        build_release({MANIFEST_PATH: b"{}"}, version=1, rollback_floor=1, created=NOW,
                      expires=NOW + timedelta(days=1))


@pytest.mark.parametrize(("version", "floor"), [(0, 1), (2, 3), (2, 0)])
def test_build_release_refuses_bad_version_or_floor(version: int, floor: int) -> None:
    with pytest.raises(ManifestError):
        _release(version=version, rollback_floor=floor)


def test_build_release_refuses_expiry_before_creation() -> None:
    with pytest.raises(ManifestError):
        _release(expires=NOW - timedelta(seconds=1))


def test_build_release_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _release(created=datetime(2030, 1, 1))


def test_sign_document_is_canonical_and_stable() -> None:
    key = SigningKey(b"\x01" * 32)
    first = sign_document(_release(), [key])
    second = sign_document(_release(), [key])
    assert first == second
    assert canonical_bytes(parse_strict_json(first)) == first
    doc = json.loads(first)
    assert doc["signatures"][0]["keyid"] == format_verify_key(key.verify_key)


def test_sign_document_signs_once_per_key_in_keyid_order() -> None:
    keys = [SigningKey.generate() for _ in range(3)]
    doc = json.loads(sign_document(_release(), [keys[0], *keys, keys[1]]))
    keyids = [s["keyid"] for s in doc["signatures"]]
    assert keyids == sorted({format_verify_key(k.verify_key) for k in keys})


def test_sign_document_needs_a_key() -> None:
    with pytest.raises(ValueError, match="signing key"):
        sign_document(_release(), [])


def test_add_signatures_keeps_signed_part_and_does_not_duplicate() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    original = sign_document(_release(), [a])
    cosigned = add_signatures(original, [b, a])
    assert json.loads(cosigned)["signed"] == json.loads(original)["signed"]
    keyids = sorted(s["keyid"] for s in json.loads(cosigned)["signatures"])
    assert keyids == sorted([format_verify_key(a.verify_key), format_verify_key(b.verify_key)])
    assert add_signatures(cosigned, [a, b]) == cosigned


def test_add_signatures_replaces_an_invalid_signature_of_the_same_key() -> None:
    a = SigningKey.generate()
    doc = json.loads(sign_document(_release(), [a]))
    doc["signatures"][0]["sig"] = doc["signatures"][0]["sig"][::-1]
    broken = canonical_bytes(doc)
    repaired = json.loads(add_signatures(broken, [a]))
    assert len(repaired["signatures"]) == 1
    assert repaired["signatures"][0]["sig"] != doc["signatures"][0]["sig"]


def test_read_unverified_returns_signed_part() -> None:
    signed = read_unverified(sign_document(_release(), [SigningKey.generate()]))
    assert (signed["version"], signed["rollback_floor"]) == (3, 2)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda s: s.update(extra=1), ManifestError),
        (lambda s: s.pop("expires"), ManifestError),
        (lambda s: s.update(type="edge-fleet/root"), ManifestError),
        (lambda s: s.update(spec_version=2), ManifestError),
        (lambda s: s.update(version=True), ManifestError),
        (lambda s: s.update(version="3"), ManifestError),
        (lambda s: s.update(created="2030-01-01 12:00:00"), ManifestError),
        (lambda s: s.update(expires="2030-02-30T00:00:00Z"), ManifestError),
        (lambda s: s.update(message=7), ManifestError),
        (lambda s: s.update(files=[]), ManifestError),
        (lambda s: s["files"].update({"a": {"sha256": "00" * 32}}), ManifestError),
        (lambda s: s["files"].update({"a": {"sha256": "AA" * 32, "size": 1}}), ManifestError),
        (lambda s: s["files"].update({"a": {"sha256": "00" * 32, "size": -1}}), ManifestError),
        (lambda s: s["files"].update({"fleet.yaml/x": {"sha256": "00" * 32, "size": 1}}), ManifestError),
        (lambda s: s["files"].update({"../x": {"sha256": "00" * 32, "size": 1}}), PathError),
        (lambda s: s["files"].update({"/etc/x": {"sha256": "00" * 32, "size": 1}}), PathError),
        (lambda s: s["files"].update({"a\x00b": {"sha256": "00" * 32, "size": 1}}), PathError),
    ],
)
def test_parse_release_fields_refuses(mutate: object, error: type[Exception]) -> None:
    signed = _release()
    mutate(signed)  # type: ignore[operator]
    with pytest.raises(error):
        parse_release_fields(signed)


def test_build_root_sorts_keys_and_checks_threshold() -> None:
    keys = [format_verify_key(SigningKey.generate().verify_key) for _ in range(3)]
    root = build_root(keys, threshold=2, version=2)
    assert root["keys"] == sorted(keys)
    with pytest.raises(ManifestError):
        build_root(keys, threshold=4, version=2)
    with pytest.raises(ManifestError):
        build_root(["ed25519:not-base64"], threshold=1, version=2)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                      max_size=4),
    max_leaves=20,
)


def _reordered(value: object, rnd: random.Random) -> object:
    """The same value with every object's keys inserted in a random order."""
    if isinstance(value, dict):
        items = [(k, _reordered(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [_reordered(v, rnd) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(value=_json_values, rnd=st.randoms(use_true_random=False))
def test_canonical_bytes_do_not_depend_on_insertion_order(value: object, rnd: random.Random) -> None:
    shuffled = _reordered(value, rnd)
    assert shuffled == value
    assert canonical_bytes(shuffled) == canonical_bytes(value)
    assert parse_strict_json(canonical_bytes(value)) == value
