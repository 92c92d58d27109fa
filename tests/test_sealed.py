"""Sealed secrets: envelope encryption to device X25519 keys, binding to id and version, recipients."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey, SealedBox

from edge_core.errors import NotARecipientError, SecretError, SecretIntegrityError
from edge_core.trust import sealed
from edge_core.trust.canonical import canonical_bytes
from edge_core.trust.keys import format_encryption_public

VALUE = b"db-password: s3cr3t\n\x00binary\xff"


def _doc(document: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(document)
    return parsed


def _write(doc: dict[str, Any]) -> bytes:
    return canonical_bytes(doc) + b"\n"


@pytest.fixture(scope="module")
def devices() -> list[PrivateKey]:
    return [PrivateKey.generate() for _ in range(4)]


def test_round_trip_one_recipient(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="db.password", version=3, recipients=[devices[0].public_key])
    assert sealed.open_sealed(doc, expected_id="db.password", key=devices[0]) == VALUE
    assert VALUE not in doc
    assert base64.b64encode(VALUE) not in doc


def test_round_trip_three_recipients(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="wifi", version=1, recipients=[d.public_key for d in devices[:3]])
    for device in devices[:3]:
        assert sealed.open_sealed(doc, expected_id="wifi", key=device) == VALUE
    info = sealed.inspect(doc)
    assert info == sealed.SealedInfo(
        "wifi", 1, tuple(sorted(format_encryption_public(d.public_key) for d in devices[:3])))


def test_document_is_canonical_json_with_trailing_newline(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(b"x", secret_id="a", version=1, recipients=[d.public_key for d in devices[:3]])
    assert doc.endswith(b"}\n")
    parsed = _doc(doc)
    assert canonical_bytes(parsed) + b"\n" == doc
    assert parsed["type"] == "edge-fleet/sealed-secret"
    assert parsed["spec_version"] == 1
    assert parsed["aead"] == "xchacha20poly1305-ietf"
    assert len(base64.b64decode(parsed["nonce"])) == 24
    keys = [r["key"] for r in parsed["recipients"]]
    assert keys == sorted(keys)


def test_every_seal_draws_a_fresh_data_key_and_nonce(devices: list[PrivateKey]) -> None:
    a = _doc(sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key]))
    b = _doc(sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key]))
    assert a["nonce"] != b["nonce"]
    assert a["ciphertext"] != b["ciphertext"]
    key_a = SealedBox(devices[0]).decrypt(base64.b64decode(a["recipients"][0]["wrapped"]))
    key_b = SealedBox(devices[0]).decrypt(base64.b64decode(b["recipients"][0]["wrapped"]))
    assert key_a != key_b


def test_empty_value_round_trips(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(b"", secret_id="empty", version=1, recipients=[devices[0].public_key])
    assert sealed.open_sealed(doc, expected_id="empty", key=devices[0]) == b""


def test_wrong_device_key_is_not_a_recipient(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key])
    with pytest.raises(NotARecipientError):
        sealed.open_sealed(doc, expected_id="s", key=devices[1])


def test_wrapped_key_swapped_between_recipients_does_not_open(devices: list[PrivateKey]) -> None:
    doc = _doc(sealed.seal(VALUE, secret_id="s", version=1, recipients=[d.public_key for d in devices[:2]]))
    r = doc["recipients"]
    r[0]["wrapped"], r[1]["wrapped"] = r[1]["wrapped"], r[0]["wrapped"]
    for device in devices[:2]:
        with pytest.raises(NotARecipientError):
            sealed.open_sealed(_write(doc), expected_id="s", key=device)


def test_id_changed_inside_the_file_fails(devices: list[PrivateKey]) -> None:
    doc = _doc(sealed.seal(VALUE, secret_id="api-token", version=1, recipients=[devices[0].public_key]))
    doc["id"] = "other-token"
    moved = _write(doc)
    with pytest.raises(SecretIntegrityError):
        sealed.open_sealed(moved, expected_id="api-token", key=devices[0])
    # even when the caller expects the new id, the associated data no longer matches
    with pytest.raises(SecretIntegrityError):
        sealed.open_sealed(moved, expected_id="other-token", key=devices[0])


def test_expected_id_differs(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="api-token", version=1, recipients=[devices[0].public_key])
    with pytest.raises(SecretIntegrityError):
        sealed.open_sealed(doc, expected_id="db-password", key=devices[0])


def test_version_changed_fails(devices: list[PrivateKey]) -> None:
    doc = _doc(sealed.seal(VALUE, secret_id="s", version=4, recipients=[devices[0].public_key]))
    doc["version"] = 5
    with pytest.raises(SecretIntegrityError):
        sealed.open_sealed(_write(doc), expected_id="s", key=devices[0])


@pytest.mark.parametrize("field", ["ciphertext", "nonce"])
def test_bit_flip_fails(devices: list[PrivateKey], field: str) -> None:
    doc = _doc(sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key]))
    raw = bytearray(base64.b64decode(doc[field]))
    raw[len(raw) // 2] ^= 0x01
    doc[field] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SecretIntegrityError):
        sealed.open_sealed(_write(doc), expected_id="s", key=devices[0])


def test_ciphertext_from_another_secret_fails(devices: list[PrivateKey]) -> None:
    a = _doc(sealed.seal(b"first", secret_id="s", version=1, recipients=[devices[0].public_key]))
    b = _doc(sealed.seal(b"second", secret_id="s", version=1, recipients=[devices[0].public_key]))
    a["ciphertext"] = b["ciphertext"]
    with pytest.raises(SecretIntegrityError):
        sealed.open_sealed(_write(a), expected_id="s", key=devices[0])


def test_add_recipient_keeps_the_data_key(devices: list[PrivateKey]) -> None:
    escrow, device_a, newcomer = devices[0], devices[1], devices[2]
    before = sealed.seal(VALUE, secret_id="s", version=2, recipients=[escrow.public_key, device_a.public_key])
    with pytest.raises(NotARecipientError):
        sealed.open_sealed(before, expected_id="s", key=newcomer)
    after = sealed.add_recipient(before, opener=escrow, new=newcomer.public_key)
    assert sealed.open_sealed(after, expected_id="s", key=newcomer) == VALUE
    assert sealed.open_sealed(after, expected_id="s", key=device_a) == VALUE
    old, new = _doc(before), _doc(after)
    assert new["ciphertext"] == old["ciphertext"]
    assert new["nonce"] == old["nonce"]
    old_wrapped = {r["key"]: r["wrapped"] for r in old["recipients"]}
    new_wrapped = {r["key"]: r["wrapped"] for r in new["recipients"]}
    assert set(new_wrapped) == set(old_wrapped) | {format_encryption_public(newcomer.public_key)}
    for key, wrapped in old_wrapped.items():
        assert new_wrapped[key] == wrapped
    escrow_text = format_encryption_public(escrow.public_key)
    data_key = SealedBox(escrow).decrypt(base64.b64decode(new_wrapped[escrow_text]))
    assert SealedBox(newcomer).decrypt(
        base64.b64decode(new_wrapped[format_encryption_public(newcomer.public_key)])) == data_key
    assert sealed.inspect(after).recipients == tuple(sorted(new_wrapped))


def test_add_recipient_twice_changes_nothing(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="s", version=1,
                      recipients=[devices[0].public_key, devices[1].public_key])
    assert sealed.add_recipient(doc, opener=devices[0], new=devices[1].public_key) == doc


def test_add_recipient_needs_an_opener_that_is_a_recipient(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key])
    with pytest.raises(NotARecipientError):
        sealed.add_recipient(doc, opener=devices[1], new=devices[1].public_key)


def test_add_recipient_refuses_a_tampered_file(devices: list[PrivateKey]) -> None:
    doc = _doc(sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key]))
    doc["version"] = 9
    with pytest.raises(SecretIntegrityError):
        sealed.add_recipient(_write(doc), opener=devices[0], new=devices[1].public_key)


def test_remove_recipient_reseals_with_a_new_data_key(devices: list[PrivateKey]) -> None:
    escrow, keep, gone = devices[0], devices[1], devices[2]
    before = sealed.seal(VALUE, secret_id="s", version=7,
                         recipients=[escrow.public_key, keep.public_key, gone.public_key])
    after = sealed.remove_recipient(before, opener=escrow, remove=gone.public_key)
    with pytest.raises(NotARecipientError):
        sealed.open_sealed(after, expected_id="s", key=gone)
    assert sealed.open_sealed(after, expected_id="s", key=keep) == VALUE
    assert sealed.open_sealed(after, expected_id="s", key=escrow) == VALUE
    old, new = _doc(before), _doc(after)
    assert new["ciphertext"] != old["ciphertext"]
    assert new["nonce"] != old["nonce"]
    assert (new["id"], new["version"]) == ("s", 7)
    old_wrapped = {r["key"]: r["wrapped"] for r in old["recipients"]}
    for r in new["recipients"]:
        assert r["wrapped"] != old_wrapped[r["key"]]
    # the removed device's old data key does not decrypt the new ciphertext
    gone_text = format_encryption_public(gone.public_key)
    old_key = SealedBox(gone).decrypt(base64.b64decode(old_wrapped[gone_text]))
    new_key = SealedBox(keep).decrypt(
        base64.b64decode({r["key"]: r["wrapped"] for r in new["recipients"]}[
            format_encryption_public(keep.public_key)]))
    assert old_key != new_key
    assert sealed.inspect(after).recipients == tuple(
        sorted(format_encryption_public(k.public_key) for k in (escrow, keep)))


def test_remove_recipient_refusals(devices: list[PrivateKey]) -> None:
    doc = sealed.seal(VALUE, secret_id="s", version=1, recipients=[devices[0].public_key])
    with pytest.raises(NotARecipientError):
        sealed.remove_recipient(doc, opener=devices[0], remove=devices[3].public_key)
    with pytest.raises(NotARecipientError):
        sealed.remove_recipient(doc, opener=devices[3], remove=devices[0].public_key)
    with pytest.raises(SecretError, match="without recipients"):
        sealed.remove_recipient(doc, opener=devices[0], remove=devices[0].public_key)


@pytest.mark.parametrize("kwargs", [
    {"secret_id": "", "version": 1},
    {"secret_id": "a/b", "version": 1},
    {"secret_id": "..", "version": 1},
    {"secret_id": "x" * 129, "version": 1},
    {"secret_id": "ok", "version": 0},
    {"secret_id": "ok", "version": True},
])
def test_seal_refuses_bad_id_or_version(devices: list[PrivateKey], kwargs: dict[str, Any]) -> None:
    with pytest.raises(SecretError):
        sealed.seal(b"v", recipients=[devices[0].public_key], **kwargs)


def test_seal_refuses_no_recipients_and_oversized_values(devices: list[PrivateKey]) -> None:
    with pytest.raises(SecretError, match="at least one recipient"):
        sealed.seal(b"v", secret_id="s", version=1, recipients=[])
    with pytest.raises(SecretError, match="larger than"):
        sealed.seal(b"\0" * (sealed.MAX_PLAINTEXT_BYTES + 1), secret_id="s", version=1,
                    recipients=[devices[0].public_key])
    big = b"\1" * sealed.MAX_PLAINTEXT_BYTES
    doc = sealed.seal(big, secret_id="s", version=1, recipients=[devices[0].public_key])
    assert sealed.open_sealed(doc, expected_id="s", key=devices[0]) == big


def test_errors_never_carry_the_plaintext(devices: list[PrivateKey]) -> None:
    secret = b"TOP-SECRET-VALUE-1234"
    doc = _doc(sealed.seal(secret, secret_id="s", version=1, recipients=[devices[0].public_key]))
    doc["version"] = 2
    with pytest.raises(SecretIntegrityError) as info:
        sealed.open_sealed(_write(doc), expected_id="s", key=devices[0])
    assert "TOP-SECRET" not in str(info.value)


def _mutations(devices: list[PrivateKey]) -> list[bytes]:
    good = sealed.seal(VALUE, secret_id="s", version=1, recipients=[d.public_key for d in devices[:2]])
    out = [b"", b"{", b"[]", b"null", good[: len(good) // 2], good.replace(b'"version":1', b'"version":1.5'),
           good + good, b'{"a":1,"a":2}', b"\xff\xfe"]

    def edit(**changes: Any) -> bytes:
        doc = _doc(good)
        for k, v in changes.items():
            if v is ...:
                del doc[k]
            else:
                doc[k] = v
        return json.dumps(doc).encode()

    out += [
        edit(type="edge-fleet/other"), edit(spec_version=2), edit(spec_version=True), edit(aead="aes"),
        edit(id="../x"), edit(id=5), edit(version=0), edit(version="1"), edit(version=False),
        edit(nonce="!!"), edit(nonce=base64.b64encode(b"short").decode()),
        edit(ciphertext=base64.b64encode(b"tiny").decode()), edit(ciphertext=None),
        edit(recipients=[]), edit(recipients={}), edit(recipients=[{"key": "x"}]),
        edit(recipients=[{"key": "ed25519:" + "A" * 43 + "=", "wrapped": "AAAA"}]),
        edit(recipients=list(reversed(_doc(good)["recipients"]))),
        edit(recipients=[_doc(good)["recipients"][0]] * 2),
        edit(recipients=[{**_doc(good)["recipients"][0], "wrapped": "AAAA"}]),
        edit(recipients=[{**_doc(good)["recipients"][0], "extra": 1}]),
        edit(extra="field"), edit(nonce=...), edit(recipients=...),
    ]
    return out


def test_malformed_documents_raise_secret_error(devices: list[PrivateKey]) -> None:
    for bad in _mutations(devices):
        with pytest.raises(SecretError) as info:
            sealed.open_sealed(bad, expected_id="s", key=devices[0])
        assert type(info.value) is SecretError, bad[:80]
        with pytest.raises(SecretError):
            sealed.inspect(bad)


def test_oversized_document_is_refused_before_parsing() -> None:
    with pytest.raises(SecretError, match="larger than"):
        sealed.inspect(b" " * (sealed.MAX_DOCUMENT_BYTES + 1))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)
_KEY = PrivateKey.generate()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode())))
def test_fuzz_open_raises_only_secret_errors(data: bytes) -> None:
    with pytest.raises(SecretError):
        sealed.open_sealed(data, expected_id="s", key=_KEY)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(
    ["type", "spec_version", "id", "version", "aead", "nonce", "ciphertext", "recipients"])), _json))
def test_fuzz_fields_raise_only_secret_errors(fields: dict[str, Any]) -> None:
    base = {"type": sealed.SEALED_TYPE, "spec_version": 1, "id": "s", "version": 1, "aead": sealed.AEAD_NAME,
            "nonce": base64.b64encode(bytes(24)).decode(), "ciphertext": base64.b64encode(bytes(40)).decode(),
            "recipients": [{"key": format_encryption_public(_KEY.public_key),
                            "wrapped": base64.b64encode(bytes(80)).decode()}]}
    base.update(fields)
    with pytest.raises(SecretError):
        sealed.open_sealed(json.dumps(base).encode(), expected_id="s", key=_KEY)


def test_secret_id_from_path() -> None:
    assert sealed.secret_id_from_path("secrets/db-password.sealed.json") == "db-password"
    assert sealed.secret_id_from_path("wifi.v2.sealed.json") == "wifi.v2"
    for bad in ("secrets/db-password.json", "secrets/.sealed.json", "secrets/a b.sealed.json",
                "x/..sealed.json"):
        with pytest.raises(SecretError):
            sealed.secret_id_from_path(bad)
