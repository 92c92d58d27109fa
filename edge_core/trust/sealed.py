"""Sealed secrets: envelope encryption of a value to one or more device X25519 encryption keys.

A sealed secret is one JSON file of the config repository, written canonically (plus a trailing
newline) so that re-sealing nothing changes nothing in Git::

    {"type": "edge-fleet/sealed-secret", "spec_version": 1, "id": "...", "version": 1,
     "aead": "xchacha20poly1305-ietf", "nonce": "<b64>", "ciphertext": "<b64>",
     "recipients": [{"key": "x25519:<b64>", "wrapped": "<b64>"}, ...]}   # sorted by key

Each seal draws a fresh 32-byte data key; the value is encrypted with XChaCha20-Poly1305 under that
key with the associated data ``canonical_bytes({"type", "id", "version"})``, so a file copied to
another secret id or version fails to open. The data key is wrapped for each recipient with a
libsodium sealed box. Nothing here ever logs a plaintext or puts one into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.utils
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from edge_core.errors import (
    KeyFileError,
    ManifestError,
    NotARecipientError,
    SecretError,
    SecretIntegrityError,
)
from edge_core.trust.canonical import canonical_bytes, parse_strict_json
from edge_core.trust.keys import format_encryption_public, parse_encryption_public

__all__ = [
    "AEAD_NAME",
    "MAX_DOCUMENT_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "MAX_RECIPIENTS",
    "SEALED_SUFFIX",
    "SEALED_TYPE",
    "SPEC_VERSION",
    "SealedInfo",
    "add_recipient",
    "inspect",
    "open_sealed",
    "remove_recipient",
    "seal",
    "secret_id_from_path",
    "validate_secret_id",
]

log = logging.getLogger(__name__)

SEALED_TYPE = "edge-fleet/sealed-secret"
SEALED_SUFFIX = ".sealed.json"
SPEC_VERSION = 1
AEAD_NAME = "xchacha20poly1305-ietf"
MAX_PLAINTEXT_BYTES = 1024 * 1024
MAX_RECIPIENTS = 10_000
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
MAX_VERSION = 2**53 - 1

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_KEYS = frozenset({"type", "spec_version", "id", "version", "aead", "nonce", "ciphertext", "recipients"})
_RECIPIENT_KEYS = frozenset({"key", "wrapped"})
_DATA_KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
_NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_WRAPPED_BYTES = _DATA_KEY_BYTES + nacl.bindings.crypto_box_SEALBYTES


@dataclass(frozen=True)
class SealedInfo:
    """What a sealed secret says about itself, readable without any key."""

    id: str
    version: int
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class _Recipient:
    key: str
    wrapped: bytes


@dataclass(frozen=True)
class _Sealed:
    id: str
    version: int
    nonce: bytes
    ciphertext: bytes
    recipients: tuple[_Recipient, ...]


def validate_secret_id(secret_id: object) -> str:
    """Return ``secret_id`` if it is a safe secret id: 1..128 of ``[A-Za-z0-9._-]``, not ``.``/``..``.

    Raises:
        SecretError: the id is not a string or not in the safe form.
    """
    if not isinstance(secret_id, str) or not _ID_RE.fullmatch(secret_id) or secret_id in (".", ".."):
        raise SecretError(f"secret id must be 1-128 characters of [A-Za-z0-9._-]: {str(secret_id)[:60]!r}")
    return secret_id


def secret_id_from_path(repo_path: str) -> str:
    """Return the secret id a sealed file at ``repo_path`` must carry: its file name without ``.sealed.json``.

    ``secrets/db-password.sealed.json`` holds secret ``db-password``; passing this as ``expected_id``
    to :func:`open_sealed` refuses a sealed file copied or renamed to another secret's name.

    Raises:
        SecretError: the file name is not ``<id>.sealed.json`` with a safe id.
    """
    name = repo_path.rsplit("/", 1)[-1]
    if not name.endswith(SEALED_SUFFIX):
        raise SecretError(f"sealed secret file name must end with {SEALED_SUFFIX}: {name[:80]!r}")
    return validate_secret_id(name[: -len(SEALED_SUFFIX)])


def _validate_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise SecretError(f"secret version must be an integer from 1 to {MAX_VERSION}: {str(version)[:30]}")
    return version


def _associated_data(secret_id: str, version: int) -> bytes:
    return canonical_bytes({"type": SEALED_TYPE, "id": secret_id, "version": version})


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise SecretError(f"sealed secret field {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecretError(f"sealed secret field {what} is not valid base64") from exc


def _parse_recipient(index: int, entry: object) -> _Recipient:
    if not isinstance(entry, dict) or set(entry) != _RECIPIENT_KEYS:
        raise SecretError(f"sealed secret recipient {index} must be an object with key and wrapped")
    key_text = entry["key"]
    try:
        key = parse_encryption_public(key_text)
    except KeyFileError as exc:
        raise SecretError(f"sealed secret recipient {index}: {exc}") from exc
    if format_encryption_public(key) != key_text:
        raise SecretError(f"sealed secret recipient {index}: key is not in canonical x25519:<base64> form")
    wrapped = _unb64(entry["wrapped"], f"recipients[{index}].wrapped")
    if len(wrapped) != _WRAPPED_BYTES:
        raise SecretError(f"sealed secret recipient {index}: wrapped key must be {_WRAPPED_BYTES} bytes")
    return _Recipient(key_text, wrapped)


def _parse(document: bytes) -> _Sealed:
    if not isinstance(document, bytes | bytearray):
        raise SecretError("sealed secret must be bytes")
    if len(document) > MAX_DOCUMENT_BYTES:
        raise SecretError(f"sealed secret is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc: Any = parse_strict_json(bytes(document))
    except ManifestError as exc:
        raise SecretError(f"sealed secret is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SecretError("sealed secret must be a JSON object")
    if set(doc) != _KEYS:
        missing = sorted(_KEYS - set(doc))
        extra = sorted(set(doc) - _KEYS)
        raise SecretError(f"sealed secret fields are wrong (missing {missing}, unknown {extra})")
    if doc["type"] != SEALED_TYPE:
        raise SecretError(f"document type is not {SEALED_TYPE}")
    if isinstance(doc["spec_version"], bool) or doc["spec_version"] != SPEC_VERSION:
        raise SecretError(f"unsupported sealed secret spec_version (this agent reads {SPEC_VERSION})")
    if doc["aead"] != AEAD_NAME:
        raise SecretError(f"unsupported sealed secret aead (this agent reads {AEAD_NAME})")
    secret_id = validate_secret_id(doc["id"])
    version = _validate_version(doc["version"])
    nonce = _unb64(doc["nonce"], "nonce")
    if len(nonce) != _NONCE_BYTES:
        raise SecretError(f"sealed secret nonce must be {_NONCE_BYTES} bytes")
    ciphertext = _unb64(doc["ciphertext"], "ciphertext")
    if not _TAG_BYTES <= len(ciphertext) <= MAX_PLAINTEXT_BYTES + _TAG_BYTES:
        raise SecretError("sealed secret ciphertext has an impossible length")
    entries = doc["recipients"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_RECIPIENTS:
        raise SecretError(f"sealed secret recipients must be a list of 1 to {MAX_RECIPIENTS} entries")
    recipients = tuple(_parse_recipient(i, e) for i, e in enumerate(entries))
    keys = [r.key for r in recipients]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise SecretError("sealed secret recipients must be sorted by key without duplicates")
    return _Sealed(secret_id, version, nonce, ciphertext, recipients)


def _serialise(sealed: _Sealed) -> bytes:
    recipients = sorted(sealed.recipients, key=lambda r: r.key)
    doc = {
        "type": SEALED_TYPE,
        "spec_version": SPEC_VERSION,
        "id": sealed.id,
        "version": sealed.version,
        "aead": AEAD_NAME,
        "nonce": _b64(sealed.nonce),
        "ciphertext": _b64(sealed.ciphertext),
        "recipients": [{"key": r.key, "wrapped": _b64(r.wrapped)} for r in recipients],
    }
    return canonical_bytes(doc) + b"\n"


def _wrap(data_key: bytes, recipient: PublicKey) -> _Recipient:
    return _Recipient(format_encryption_public(recipient), SealedBox(recipient).encrypt(data_key))


def _unique_keys(recipients: Sequence[PublicKey]) -> dict[str, PublicKey]:
    out: dict[str, PublicKey] = {}
    for key in recipients:
        if not isinstance(key, PublicKey):
            raise SecretError("every recipient must be an X25519 public key")
        out[format_encryption_public(key)] = key
    return out


def _encrypt(plaintext: bytes, secret_id: str, version: int, recipients: dict[str, PublicKey]) -> _Sealed:
    if not recipients:
        raise SecretError("a sealed secret needs at least one recipient")
    if len(recipients) > MAX_RECIPIENTS:
        raise SecretError(f"a sealed secret takes at most {MAX_RECIPIENTS} recipients")
    data_key = nacl.utils.random(_DATA_KEY_BYTES)
    nonce = nacl.utils.random(_NONCE_BYTES)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _associated_data(secret_id, version), nonce, data_key)
    wrapped = tuple(_wrap(data_key, key) for key in recipients.values())
    return _Sealed(secret_id, version, nonce, ciphertext, wrapped)


def seal(plaintext: bytes, *, secret_id: str, version: int, recipients: Sequence[PublicKey]) -> bytes:
    """Encrypt ``plaintext`` to every key of ``recipients`` and return the sealed file's bytes.

    A fresh data key and nonce are drawn for every call. Duplicate recipients are sealed to once.

    Raises:
        SecretError: plaintext not bytes or over 1 MiB, bad id or version, no recipients or too many.
    """
    if not isinstance(plaintext, bytes | bytearray):
        raise SecretError("the value to seal must be bytes")
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise SecretError(f"the value to seal is larger than {MAX_PLAINTEXT_BYTES} bytes")
    validate_secret_id(secret_id)
    _validate_version(version)
    sealed = _encrypt(bytes(plaintext), secret_id, version, _unique_keys(recipients))
    log.debug("sealed secret %s version %s to %d recipients", secret_id, version, len(sealed.recipients))
    return _serialise(sealed)


def _unwrap(sealed: _Sealed, key: PrivateKey) -> bytes:
    if not isinstance(key, PrivateKey):
        raise SecretError("the opening key must be an X25519 private key")
    mine = format_encryption_public(key.public_key)
    entry = next((r for r in sealed.recipients if r.key == mine), None)
    if entry is None:
        raise NotARecipientError(f"{mine} is not a recipient of secret {sealed.id}")
    try:
        return SealedBox(key).decrypt(entry.wrapped)
    except CryptoError as exc:
        raise NotARecipientError(
            f"the data key of secret {sealed.id} cannot be unwrapped with {mine}") from exc


def _decrypt(sealed: _Sealed, data_key: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed.ciphertext, _associated_data(sealed.id, sealed.version), sealed.nonce, data_key)
    except (CryptoError, ValueError) as exc:
        raise SecretIntegrityError(
            f"secret {sealed.id} version {sealed.version} failed its integrity check "
            "(tampered, or moved to another id or version)") from exc


def open_sealed(document: bytes, *, expected_id: str, key: PrivateKey) -> bytes:
    """Decrypt a sealed secret with this device's X25519 key and return the plaintext.

    Raises:
        SecretError: the document is malformed.
        SecretIntegrityError: its id is not ``expected_id``, or the ciphertext, nonce, id or version
            was altered.
        NotARecipientError: ``key`` is not a recipient, or its wrapped data key does not open.
    """
    sealed = _parse(document)
    if sealed.id != expected_id:
        raise SecretIntegrityError(f"sealed secret has id {sealed.id!r}, expected {str(expected_id)[:130]!r}")
    return _decrypt(sealed, _unwrap(sealed, key))


def inspect(document: bytes) -> SealedInfo:
    """Return the id, version and recipient keys of a sealed secret, without decrypting anything.

    Raises:
        SecretError: the document is malformed.
    """
    sealed = _parse(document)
    return SealedInfo(sealed.id, sealed.version, tuple(r.key for r in sealed.recipients))


def add_recipient(document: bytes, *, opener: PrivateKey, new: PublicKey) -> bytes:
    """Wrap the same data key for one more recipient; the ciphertext and nonce stay unchanged.

    ``opener`` must already be a recipient (typically an operator escrow key). The document is
    checked to decrypt before it is rewritten, so a tampered file is never extended. Adding a key that
    is already a recipient returns the document unchanged (in canonical form).

    Raises:
        SecretError: the document is malformed, ``new`` is not a public key, or too many recipients.
        NotARecipientError: ``opener`` is not a recipient.
        SecretIntegrityError: the document fails its integrity check.
    """
    sealed = _parse(document)
    data_key = _unwrap(sealed, opener)
    _decrypt(sealed, data_key)
    if not isinstance(new, PublicKey):
        raise SecretError("the new recipient must be an X25519 public key")
    new_text = format_encryption_public(new)
    if any(r.key == new_text for r in sealed.recipients):
        return _serialise(sealed)
    if len(sealed.recipients) >= MAX_RECIPIENTS:
        raise SecretError(f"a sealed secret takes at most {MAX_RECIPIENTS} recipients")
    updated = _Sealed(sealed.id, sealed.version, sealed.nonce, sealed.ciphertext,
                      (*sealed.recipients, _wrap(data_key, new)))
    log.debug("added recipient %s to secret %s", new_text, sealed.id)
    return _serialise(updated)


def remove_recipient(document: bytes, *, opener: PrivateKey, remove: PublicKey) -> bytes:
    """Re-seal the secret for every recipient but ``remove``, with a new data key and nonce.

    The id and version stay the same. The removed key's old wrapped data key is useless for the new
    file, but the old file stays in Git history: rotate the value itself if that device may have read it.

    Raises:
        SecretError: the document is malformed, or removing would leave no recipient.
        NotARecipientError: ``opener`` or ``remove`` is not a recipient.
        SecretIntegrityError: the document fails its integrity check.
    """
    sealed = _parse(document)
    plaintext = _decrypt(sealed, _unwrap(sealed, opener))
    if not isinstance(remove, PublicKey):
        raise SecretError("the recipient to remove must be an X25519 public key")
    gone = format_encryption_public(remove)
    if all(r.key != gone for r in sealed.recipients):
        raise NotARecipientError(f"{gone} is not a recipient of secret {sealed.id}")
    remaining = {r.key: parse_encryption_public(r.key) for r in sealed.recipients if r.key != gone}
    if not remaining:
        raise SecretError(f"removing {gone} would leave secret {sealed.id} without recipients")
    resealed = _encrypt(plaintext, sealed.id, sealed.version, remaining)
    log.debug("removed recipient %s from secret %s", gone, sealed.id)
    return _serialise(resealed)
