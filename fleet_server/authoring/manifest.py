"""Building and signing release manifests and root metadata: the operator's half of the format.

Devices only verify (:mod:`edge_core.trust.verify`); building, signing, co-signing and reading a
manifest without trusting it happen on the operator's machine, so this code is not installed on the
device's import path. The format and its structural checks live in :mod:`edge_core.trust.manifest`;
every document built here passes them before it is returned. Pure: no file, clock or network access.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from edge_core.paths import validate_repo_path
from edge_core.trust.canonical import canonical_bytes
from edge_core.trust.keys import SigningKey, format_verify_key
from edge_core.trust.manifest import (
    RELEASE_TYPE,
    ROOT_TYPE,
    SPEC_VERSION,
    file_digest,
    format_time,
    parse_release_fields,
    parse_root_fields,
    parse_signed_document,
    signature_is_valid,
)

__all__ = ["add_signatures", "build_release", "build_root", "read_unverified", "sign_document"]


def _sign_one(signed_bytes: bytes, key: SigningKey) -> dict[str, str]:
    sig = key.sign(signed_bytes).signature
    return {"keyid": format_verify_key(key.verify_key), "sig": base64.b64encode(sig).decode("ascii")}


def _serialise(signed: Mapping[str, Any], signatures: Iterable[Mapping[str, str]]) -> bytes:
    ordered = sorted(signatures, key=lambda s: (s["keyid"], s["sig"]))
    return canonical_bytes({"signed": dict(signed), "signatures": ordered})


def build_release(files: Mapping[str, bytes], *, version: int, rollback_floor: int, created: datetime,
                  expires: datetime, message: str | None = None) -> dict[str, Any]:
    """Build the "signed" part of a release manifest listing every file with its digest and size.

    Args:
        files: repo path -> content, every file of the release except the manifest itself.
        version: the release version (>= 1).
        rollback_floor: the lowest version devices may accept after this one (1 <= floor <= version).
        created: when the release was made (timezone-aware).
        expires: when devices stop accepting it (timezone-aware, after ``created``).
        message: an optional operator note.

    Raises:
        PathError: a path is absolute, escapes with ``..``, holds a NUL byte or is not normalised.
        ManifestError: a value is out of range, or ``files`` holds the manifest itself.
        ValueError: ``created`` or ``expires`` is naive.
    """
    signed: dict[str, Any] = {
        "type": RELEASE_TYPE,
        "spec_version": SPEC_VERSION,
        "version": version,
        "created": format_time(created),
        "expires": format_time(expires),
        "rollback_floor": rollback_floor,
        "files": {},
    }
    for path, data in files.items():
        validate_repo_path(path)
        sha, size = file_digest(data)
        signed["files"][path] = {"sha256": sha, "size": size}
    if message is not None:
        signed["message"] = message
    parse_release_fields(signed)
    return signed


def build_root(keys: Iterable[str], *, threshold: int, version: int) -> dict[str, Any]:
    """Build the "signed" part of root metadata: a numbered set of trusted keys and a threshold.

    Raises:
        ManifestError: a key is not a canonical ed25519 key, a key repeats, or the threshold is out of
            range.
    """
    signed: dict[str, Any] = {
        "type": ROOT_TYPE,
        "spec_version": SPEC_VERSION,
        "version": version,
        "keys": sorted(keys),
        "threshold": threshold,
    }
    parse_root_fields(signed)
    return signed


def sign_document(signed: Mapping[str, Any], keys: Sequence[SigningKey]) -> bytes:
    """Sign ``signed`` with every key and return the whole document as canonical bytes.

    A key given twice signs once. Signatures are ordered by key id so the bytes are stable.

    Raises:
        ValueError: no key was given.
        ManifestError: ``signed`` holds a value canonical JSON cannot carry (a float).
    """
    if not keys:
        raise ValueError("at least one signing key is needed")
    signed_bytes = canonical_bytes(signed)
    by_keyid: dict[str, dict[str, str]] = {}
    for key in keys:
        entry = _sign_one(signed_bytes, key)
        by_keyid.setdefault(entry["keyid"], entry)
    return _serialise(signed, by_keyid.values())


def add_signatures(document: bytes, keys: Sequence[SigningKey]) -> bytes:
    """Co-sign: add the signatures of ``keys`` to an existing document without changing "signed".

    A key that already holds a valid signature is not added again; an invalid signature by one of
    ``keys`` is replaced by a valid one. Other signatures are kept as they are.

    Raises:
        ManifestError: the document is not a well-formed signed document.
    """
    signed, sigs = parse_signed_document(document)
    signed_bytes = canonical_bytes(signed)
    entries = [{"keyid": s.keyid, "sig": s.sig} for s in sigs]
    for key in keys:
        keyid = format_verify_key(key.verify_key)
        mine = [s for s in sigs if s.keyid == keyid]
        if any(signature_is_valid(signed_bytes, s) == keyid for s in mine):
            continue
        entries = [e for e in entries if e["keyid"] != keyid]
        entries.append(_sign_one(signed_bytes, key))
    return _serialise(signed, entries)


def read_unverified(document: bytes) -> dict[str, Any]:
    """Return the structurally checked "signed" part of a release WITHOUT checking signatures.

    For tooling only (the previous version and floor when signing the next release); never use the
    result to trust anything.

    Raises:
        ManifestError: malformed document or release structure.
        PathError: a listed path is unsafe.
    """
    signed, _ = parse_signed_document(document)
    parse_release_fields(signed)
    return signed

