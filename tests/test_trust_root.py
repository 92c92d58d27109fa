"""Root-key rotation: a new key set is trusted only when the old AND the new thresholds signed it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from nacl.signing import SigningKey

from edge_core.errors import RootRotationError, ThresholdError, UntrustedKeyError
from edge_core.trust.canonical import canonical_bytes
from edge_core.trust.keys import format_verify_key
from edge_core.trust.verify import (
    TrustRoot,
    update_trust_root,
    verify_genesis_root,
    verify_release,
    verify_root_rotation,
)
from fleet_server.authoring.manifest import build_release, build_root, sign_document

NOW = datetime(2031, 3, 1, tzinfo=UTC)
OLD = [SigningKey.generate() for _ in range(3)]
NEW = [SigningKey.generate() for _ in range(3)]


def _pub(keys: list[SigningKey]) -> list[str]:
    return [format_verify_key(k.verify_key) for k in keys]


CURRENT = TrustRoot(frozenset(_pub(OLD)), threshold=2, version=1)


def _root(keys: list[SigningKey], signers: list[SigningKey], *, version: int = 2,
          threshold: int = 2) -> bytes:
    return sign_document(build_root(_pub(keys), threshold=threshold, version=version), signers)


def _release(signers: list[SigningKey]) -> bytes:
    signed = build_release({"fleet.yaml": b"x: 1\n"}, version=7, rollback_floor=1, created=NOW,
                           expires=NOW + timedelta(days=7))
    return sign_document(signed, signers)


def test_rotation_signed_only_by_new_keys_is_refused() -> None:
    with pytest.raises(RootRotationError, match="current keys"):
        verify_root_rotation(CURRENT, _root(NEW, NEW))


def test_rotation_signed_below_old_threshold_is_refused() -> None:
    with pytest.raises(RootRotationError, match="current keys"):
        verify_root_rotation(CURRENT, _root(NEW, [OLD[0], *NEW]))


def test_rotation_without_proof_of_new_keys_is_refused() -> None:
    with pytest.raises(RootRotationError, match="new keys"):
        verify_root_rotation(CURRENT, _root(NEW, [*OLD[:2], NEW[0]]))


def test_rotation_must_be_the_next_version() -> None:
    for version in (3, 1):
        with pytest.raises(RootRotationError, match="expected 2"):
            verify_root_rotation(CURRENT, _root(NEW, OLD[:2] + NEW[:2], version=version))


def test_malformed_root_document_is_refused() -> None:
    for document in (b"{", b"{}", _release(OLD)):
        with pytest.raises(RootRotationError):
            verify_root_rotation(CURRENT, document)


def test_tampered_root_document_is_refused() -> None:
    doc = json.loads(_root(NEW, OLD[:2] + NEW[:2]))
    doc["signed"]["threshold"] = 1
    with pytest.raises(RootRotationError):
        verify_root_rotation(CURRENT, canonical_bytes(doc))


def test_proper_rotation_moves_trust_to_the_new_keys() -> None:
    rotated = verify_root_rotation(CURRENT, _root(NEW, OLD[:2] + NEW[:2]))
    assert rotated == TrustRoot(frozenset(_pub(NEW)), threshold=2, version=2)
    assert verify_release(_release(NEW[1:]), rotated, now=NOW, floor=0).version == 7
    with pytest.raises(UntrustedKeyError):
        verify_release(_release(OLD), rotated, now=NOW, floor=0)
    with pytest.raises(ThresholdError):
        verify_release(_release([NEW[0], OLD[0], OLD[1]]), rotated, now=NOW, floor=0)


def test_update_trust_root_walks_the_chain() -> None:
    third = [SigningKey.generate()]
    documents = {
        1: _root(OLD, OLD, version=1),
        2: _root(NEW, OLD[:2] + NEW[:2]),
        3: _root(third, NEW[:2] + third, version=3, threshold=1),
        5: b"ignored: version 4 is missing",
    }
    trust = update_trust_root(CURRENT, documents)
    assert trust == TrustRoot(frozenset(_pub(third)), threshold=1, version=3)
    assert verify_release(_release(third), trust, now=NOW, floor=0).signers == frozenset(_pub(third))
    assert update_trust_root(trust, documents) == trust
    assert update_trust_root(CURRENT, {}) == CURRENT


def test_update_trust_root_refuses_a_bad_link() -> None:
    documents = {2: _root(NEW, OLD[:2] + NEW[:2]), 3: _root(OLD, OLD, version=3)}
    with pytest.raises(RootRotationError, match="root 3"):
        update_trust_root(CURRENT, documents)


def test_genesis_root_must_be_signed_by_its_own_threshold() -> None:
    assert verify_genesis_root(_root(OLD, OLD[:2], version=1)) == CURRENT
    with pytest.raises(RootRotationError):
        verify_genesis_root(_root(OLD, [OLD[0], NEW[0]], version=1))
    with pytest.raises(RootRotationError):
        verify_genesis_root(_root(OLD, OLD, version=2))
