"""Release manifests and root metadata: their format, and the structural checks of a signed document.

A signed document is ``{"signed": {...}, "signatures": [{"keyid": "ed25519:<b64>", "sig": "<b64>"}]}``
where every signature is Ed25519 over ``canonical_bytes(signed)``. The whole document is serialised
canonically too, so the same release always gives the same bytes.

Two kinds of "signed" part exist:

- a release (``type`` ``edge-fleet/release``): version, created, expires, rollback floor and every
  file of the repository (except :data:`MANIFEST_PATH` itself) with its SHA-256 and size;
- a root (``type`` ``edge-fleet/root``): a numbered set of trusted keys and a threshold, stored as
  ``.fleet/root/<N>.json``.

This module is pure (no file, clock or network access). The structural parsers here are shared by
the verifier (:mod:`edge_core.trust.verify`) and the operator's signing code
(:mod:`fleet_server.authoring.manifest`, which builds and signs documents); they never check
signatures themselves (:func:`signature_is_valid` checks one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nacl.exceptions import BadSignatureError

from edge_core.errors import KeyFileError, ManifestError
from edge_core.paths import validate_repo_path
from edge_core.trust.canonical import parse_strict_json
from edge_core.trust.keys import format_verify_key, parse_verify_key

__all__ = [
    "MANIFEST_PATH",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "MAX_MESSAGE_CHARS",
    "MAX_ROOT_BYTES",
    "MAX_SIGNATURES",
    "RELEASE_TYPE",
    "ROOT_DIR",
    "ROOT_TYPE",
    "SPEC_VERSION",
    "FileEntry",
    "ReleaseFields",
    "RootFields",
    "Signature",
    "file_digest",
    "format_time",
    "parse_release_fields",
    "parse_root_fields",
    "parse_signed_document",
    "parse_time",
    "root_path",
    "signature_is_valid",
]

MANIFEST_PATH = ".fleet/release.json"
ROOT_DIR = ".fleet/root"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_ROOT_BYTES = 1024 * 1024
MAX_FILES = 100_000
MAX_SIGNATURES = 256
MAX_MESSAGE_CHARS = 4096
SPEC_VERSION = 1
RELEASE_TYPE = "edge-fleet/release"
ROOT_TYPE = "edge-fleet/root"

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RELEASE_REQUIRED = frozenset(
    {"type", "spec_version", "version", "created", "expires", "rollback_floor", "files"})
_RELEASE_ALLOWED = _RELEASE_REQUIRED | {"message"}
_ROOT_FIELDS = frozenset({"type", "spec_version", "version", "keys", "threshold"})
_MAX_KEYS = 64


@dataclass(frozen=True)
class FileEntry:
    """One file of a release: its SHA-256 (lower-case hex) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Signature:
    """One entry of a document's ``signatures`` list, as written (not yet checked)."""

    keyid: str
    sig: str


@dataclass(frozen=True)
class ReleaseFields:
    """The structurally valid "signed" part of a release manifest (signatures not checked)."""

    version: int
    rollback_floor: int
    created: datetime
    expires: datetime
    files: Mapping[str, FileEntry]
    message: str | None


@dataclass(frozen=True)
class RootFields:
    """The structurally valid "signed" part of a root metadata document (signatures not checked)."""

    version: int
    keys: frozenset[str]
    threshold: int


def file_digest(data: bytes) -> tuple[str, int]:
    """Return the SHA-256 (lower-case hex) and the size of ``data``."""
    return hashlib.sha256(data).hexdigest(), len(data)


def root_path(version: int) -> str:
    """Return the repo-relative path of root metadata version ``version`` (``.fleet/root/<N>.json``)."""
    return f"{ROOT_DIR}/{version}.json"


def format_time(moment: datetime) -> str:
    """Return ``moment`` as ``YYYY-MM-DDTHH:MM:SSZ`` in UTC (sub-seconds dropped).

    Raises:
        ValueError: ``moment`` is naive (has no time zone).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(text: object, field: str) -> datetime:
    """Parse a ``YYYY-MM-DDTHH:MM:SSZ`` timestamp into an aware UTC datetime.

    Raises:
        ManifestError: not a string of exactly that form, or not a real date.
    """
    if not isinstance(text, str) or not _TIME_RE.match(text):
        raise ManifestError(f"{field} must be a time like 2030-01-31T12:00:00Z")
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ManifestError(f"{field} is not a valid time: {text}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(signed: Mapping[str, Any], kind: str, required: frozenset[str],
                  allowed: frozenset[str]) -> None:
    unknown = sorted(set(signed) - allowed)
    if unknown:
        raise ManifestError(f"unknown field {unknown[0]!r} in signed {kind}")
    missing = sorted(required - set(signed))
    if missing:
        raise ManifestError(f"missing field {missing[0]!r} in signed {kind}")
    expected_type = RELEASE_TYPE if kind == "release" else ROOT_TYPE
    if signed["type"] != expected_type:
        raise ManifestError(f"type must be {expected_type!r}, got {str(signed['type'])[:60]!r}")
    if not _is_int(signed["spec_version"]) or signed["spec_version"] != SPEC_VERSION:
        raise ManifestError(f"unsupported spec_version {str(signed['spec_version'])[:20]}")
    if not _is_int(signed["version"]) or signed["version"] < 1:
        raise ManifestError("version must be an integer >= 1")


def _parse_files(raw: object) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        raise ManifestError("files must be an object of path -> {sha256, size}")
    if len(raw) > MAX_FILES:
        raise ManifestError(f"files lists {len(raw)} entries, more than the limit {MAX_FILES}")
    files: dict[str, FileEntry] = {}
    for path, entry in raw.items():
        validate_repo_path(path)
        if path == MANIFEST_PATH:
            raise ManifestError(f"the manifest must not list itself ({MANIFEST_PATH})")
        if not isinstance(entry, dict) or set(entry) != {"sha256", "size"}:
            raise ManifestError(f"entry for {path} must have exactly the fields sha256 and size")
        sha, size = entry["sha256"], entry["size"]
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ManifestError(f"sha256 of {path} must be 64 lower-case hex digits")
        if not _is_int(size) or size < 0:
            raise ManifestError(f"size of {path} must be an integer >= 0")
        files[path] = FileEntry(sha, size)
    _check_no_file_under_file(files)
    return files


def _check_no_file_under_file(files: Mapping[str, FileEntry]) -> None:
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise ManifestError(f"{path} lies under {parent}, which is listed as a file")


def parse_release_fields(signed: object) -> ReleaseFields:
    """Check the structure of a release's "signed" part and return its fields.

    Raises:
        ManifestError: a field is missing, unknown, of the wrong type or out of range, the floor is
            above the version, or expiry is not after creation.
        PathError: a listed path is absolute, escapes with ``..``, holds a NUL byte or is not
            normalised.
    """
    if not isinstance(signed, dict):
        raise ManifestError("signed must be an object")
    _check_header(signed, "release", _RELEASE_REQUIRED, _RELEASE_ALLOWED)
    version: int = signed["version"]
    floor = signed["rollback_floor"]
    if not _is_int(floor) or floor < 1:
        raise ManifestError("rollback_floor must be an integer >= 1")
    if floor > version:
        raise ManifestError(f"rollback_floor {floor} is above the release version {version}")
    created = parse_time(signed["created"], "created")
    expires = parse_time(signed["expires"], "expires")
    if expires <= created:
        raise ManifestError("expires must be after created")
    message = signed.get("message")
    if message is not None and (not isinstance(message, str) or len(message) > MAX_MESSAGE_CHARS):
        raise ManifestError(f"message must be a string of at most {MAX_MESSAGE_CHARS} characters")
    files = _parse_files(signed["files"])
    return ReleaseFields(version=version, rollback_floor=floor, created=created, expires=expires,
                         files=files, message=message)


def _canonical_key(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise ManifestError(f"{what} must be a string")
    try:
        canonical = format_verify_key(parse_verify_key(text))
    except KeyFileError as exc:
        raise ManifestError(f"{what} is not an ed25519 public key: {text[:60]!r}") from exc
    if canonical != text:
        raise ManifestError(f"{what} is not in canonical form: {text[:60]!r}")
    return canonical


def parse_root_fields(signed: object) -> RootFields:
    """Check the structure of a root document's "signed" part and return its fields.

    Raises:
        ManifestError: a field is missing, unknown or invalid; a key is not a canonical ed25519 key or
            is listed twice; the threshold is not between 1 and the number of keys.
    """
    if not isinstance(signed, dict):
        raise ManifestError("signed must be an object")
    _check_header(signed, "root", _ROOT_FIELDS, _ROOT_FIELDS)
    raw_keys = signed["keys"]
    if not isinstance(raw_keys, list) or not raw_keys or len(raw_keys) > _MAX_KEYS:
        raise ManifestError(f"keys must be a list of 1 to {_MAX_KEYS} ed25519 public keys")
    keys = [_canonical_key(k, "root key") for k in raw_keys]
    if len(set(keys)) != len(keys):
        raise ManifestError("root keys list a key twice")
    threshold = signed["threshold"]
    if not _is_int(threshold) or not 1 <= threshold <= len(keys):
        raise ManifestError(f"threshold must be an integer between 1 and {len(keys)}")
    return RootFields(version=signed["version"], keys=frozenset(keys), threshold=threshold)


def parse_signed_document(document: bytes) -> tuple[dict[str, Any], list[Signature]]:
    """Parse a signed document into its "signed" object and its signature entries.

    Only the envelope is checked here (strict JSON, exactly ``signed`` and ``signatures``, every
    signature an object of two strings); whether a signature is valid is the verifier's job.

    Raises:
        ManifestError: not strict JSON (duplicate keys, floats), truncated, or a malformed envelope.
    """
    value = parse_strict_json(document)
    if not isinstance(value, dict) or set(value) != {"signed", "signatures"}:
        raise ManifestError("document must be an object with exactly 'signed' and 'signatures'")
    signed, raw_sigs = value["signed"], value["signatures"]
    if not isinstance(signed, dict):
        raise ManifestError("signed must be an object")
    if not isinstance(raw_sigs, list):
        raise ManifestError("signatures must be a list")
    if len(raw_sigs) > MAX_SIGNATURES:
        raise ManifestError(f"more than {MAX_SIGNATURES} signatures")
    sigs: list[Signature] = []
    for entry in raw_sigs:
        if (not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}
                or not isinstance(entry["keyid"], str) or not isinstance(entry["sig"], str)):
            raise ManifestError("each signature must be an object with string fields keyid and sig")
        sigs.append(Signature(entry["keyid"], entry["sig"]))
    return signed, sigs


def signature_is_valid(signed_bytes: bytes, signature: Signature) -> str | None:
    """Return the canonical key id if ``signature`` is a valid Ed25519 signature, else None."""
    try:
        key = parse_verify_key(signature.keyid)
        raw = base64.b64decode(signature.sig, validate=True)
    except (KeyFileError, binascii.Error, ValueError):
        return None
    keyid = format_verify_key(key)
    if keyid != signature.keyid or len(raw) != 64:
        return None
    try:
        key.verify(signed_bytes, raw)
    except BadSignatureError:
        return None
    return keyid
