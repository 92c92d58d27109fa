"""The release verifier: a pure core that decides whether a release may be trusted.

Nothing here reads files, the network or the clock: the caller passes the manifest bytes, the trust
root, the current time and the highest rollback floor the device has verified. Every failed check
raises its own class from :mod:`edge_core.errors` with a one-line reason.

Order of the release checks (the first failure wins): size cap, structure, signatures, expiry,
rollback. Then :func:`check_tree` / :func:`check_file` compare files with the verified manifest.
Root rotation (:func:`verify_root_rotation`, :func:`update_trust_root`) moves the trust root to a new
key set when the old threshold AND the new threshold both signed it.

:func:`verify_tree` composes them for a whole release tree (root rotations in ``.fleet/root/``, the
manifest, every file): the one verification the agent, the server's Git watcher and
``fleetctl release verify`` run, so one failure raises one error (class and message) everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple

from edge_core.errors import (
    ConfigError,
    ExpiredError,
    FileHashMismatch,
    FileMissing,
    KeyFileError,
    ManifestError,
    ManifestTooLarge,
    RollbackError,
    RootRotationError,
    ThresholdError,
    UnlistedFile,
    UntrustedKeyError,
)
from edge_core.trust.canonical import canonical_bytes
from edge_core.trust.keys import format_verify_key, parse_verify_key
from edge_core.trust.manifest import (
    MANIFEST_PATH,
    MAX_MANIFEST_BYTES,
    MAX_ROOT_BYTES,
    ROOT_DIR,
    FileEntry,
    RootFields,
    Signature,
    file_digest,
    format_time,
    parse_release_fields,
    parse_root_fields,
    parse_signed_document,
    signature_is_valid,
)

__all__ = [
    "FileEntry",
    "TreeVerdict",
    "TrustRoot",
    "VerifiedRelease",
    "check_file",
    "check_tree",
    "recheck_release",
    "root_documents",
    "tree_index",
    "update_trust_root",
    "verify_genesis_root",
    "verify_release",
    "verify_root_rotation",
    "verify_tree",
]


@dataclass(frozen=True)
class TrustRoot:
    """The keys a device trusts and how many of them must sign (k of n), at a root version.

    Raises:
        ConfigError: on construction, when a key is not a canonical ``ed25519:<base64>`` key or the
            threshold is not between 1 and the number of keys, or the version is below 1.
    """

    keys: frozenset[str]
    threshold: int
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.keys, frozenset):
            raise ConfigError("trusted keys must be a frozenset of ed25519 public keys")
        for key in self.keys:
            try:
                canonical = format_verify_key(parse_verify_key(key))
            except KeyFileError as exc:
                raise ConfigError(f"trusted key is not an ed25519 public key: {str(key)[:60]!r}") from exc
            if canonical != key:
                raise ConfigError(f"trusted key is not in canonical form: {key[:60]!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) \
                or not 1 <= self.threshold <= len(self.keys):
            raise ConfigError(f"threshold must be between 1 and the number of trusted keys "
                              f"({len(self.keys)})")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError("trust root version must be an integer >= 1")


@dataclass(frozen=True)
class VerifiedRelease:
    """A release manifest that passed every check; ``files`` maps repo path -> FileEntry."""

    version: int
    rollback_floor: int
    created: datetime
    expires: datetime
    files: Mapping[str, FileEntry]
    signers: frozenset[str]
    message: str | None


def _valid_signers(signed_bytes: bytes, signatures: Iterable[Signature], trusted: frozenset[str]) -> set[str]:
    """Return the distinct trusted keys with a valid signature; invalid or untrusted ones are ignored."""
    signers: set[str] = set()
    for sig in signatures:
        if sig.keyid in trusted and sig.keyid not in signers:
            keyid = signature_is_valid(signed_bytes, sig)
            if keyid is not None:
                signers.add(keyid)
    return signers


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")


def _check_time_and_floor(version: int, expires: datetime, *, now: datetime, floor: int) -> None:
    if now >= expires:
        raise ExpiredError(f"release {version} expired at {format_time(expires)}")
    if version < floor:
        raise RollbackError(f"release {version} is below the rollback floor {floor}")


def recheck_release(release: VerifiedRelease, *, now: datetime, floor: int) -> None:
    """Check again what can change for a release verified earlier: its expiry and the floor.

    For a caller that keeps a verified release (the daemon's sync cache); the errors and messages
    are those of :func:`verify_release`.

    Raises:
        ExpiredError: ``now`` is at or after its expiry.
        RollbackError: its version is below ``floor``.
        ValueError: ``now`` is naive.
    """
    _require_aware(now)
    _check_time_and_floor(release.version, release.expires, now=now, floor=floor)


def verify_release(document: bytes, trust: TrustRoot, *, now: datetime, floor: int,
                   max_bytes: int = MAX_MANIFEST_BYTES) -> VerifiedRelease:
    """Verify a release manifest against a trust root at time ``now`` and return its contents.

    Args:
        document: the manifest bytes as fetched (untrusted).
        trust: the trusted keys and threshold.
        now: the current time (timezone-aware).
        floor: the highest rollback floor this device has verified so far (0 if none).
        max_bytes: refuse larger documents before parsing.

    Raises:
        ManifestTooLarge: the document is over ``max_bytes``.
        ManifestError: malformed, truncated, duplicate keys, unknown fields, floor above version.
        PathError: a listed path is unsafe (``..``, absolute, NUL).
        UntrustedKeyError: no trusted key signed it validly.
        ThresholdError: fewer than ``trust.threshold`` distinct trusted keys signed it validly.
        ExpiredError: ``now`` is at or after its expiry.
        RollbackError: its version is below ``floor``.
        ValueError: ``now`` is naive.
    """
    _require_aware(now)
    if len(document) > max_bytes:
        raise ManifestTooLarge(f"release manifest is {len(document)} bytes, over the cap of {max_bytes}")
    signed, signatures = parse_signed_document(document)
    fields = parse_release_fields(signed)
    signers = _valid_signers(canonical_bytes(signed), signatures, trust.keys)
    if not signers:
        raise UntrustedKeyError(f"release {fields.version} is not validly signed by any trusted key")
    if len(signers) < trust.threshold:
        raise ThresholdError(f"release {fields.version} has {len(signers)} valid trusted signature(s), "
                             f"{trust.threshold} required")
    _check_time_and_floor(fields.version, fields.expires, now=now, floor=floor)
    return VerifiedRelease(version=fields.version, rollback_floor=fields.rollback_floor,
                           created=fields.created, expires=fields.expires,
                           files=MappingProxyType(dict(fields.files)), signers=frozenset(signers),
                           message=fields.message)


def check_tree(release: VerifiedRelease, tree: Mapping[str, tuple[str, int]]) -> None:
    """Check that ``tree`` holds exactly the files of ``release`` with their digests and sizes.

    Args:
        release: the verified manifest.
        tree: every repo path of the commit -> (sha256 hex, size); an entry for the manifest itself
            is ignored.

    Raises:
        FileMissing: a listed file is not in the tree.
        UnlistedFile: a file in the tree is not listed.
        FileHashMismatch: a file's digest or size differs.
    """
    present = set(tree) - {MANIFEST_PATH}
    missing = sorted(set(release.files) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileMissing(f"{missing[0]} is listed in release {release.version} but missing{more}")
    unlisted = sorted(present - set(release.files))
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise UnlistedFile(f"{unlisted[0]} is not listed in release {release.version}{more}")
    for path in sorted(present):
        entry = release.files[path]
        sha, size = tree[path]
        if sha != entry.sha256 or size != entry.size:
            raise FileHashMismatch(f"{path} does not match its digest or size in release {release.version}")


def check_file(release: VerifiedRelease, path: str, data: bytes) -> None:
    """Check one used file's content against its entry in ``release``.

    Raises:
        UnlistedFile: ``path`` is not listed.
        FileHashMismatch: the content's digest or size differs.
    """
    entry = release.files.get(path)
    if entry is None:
        raise UnlistedFile(f"{path} is not listed in release {release.version}")
    sha, size = file_digest(data)
    if sha != entry.sha256 or size != entry.size:
        raise FileHashMismatch(f"{path} does not match its digest or size in release {release.version}")


def _parse_root(document: bytes) -> tuple[dict[str, Any], list[Signature], RootFields]:
    if len(document) > MAX_ROOT_BYTES:
        raise RootRotationError(f"root metadata is {len(document)} bytes, over the cap of {MAX_ROOT_BYTES}")
    try:
        signed, signatures = parse_signed_document(document)
        fields = parse_root_fields(signed)
    except ManifestError as exc:
        raise RootRotationError(f"root metadata is malformed: {exc}") from exc
    return signed, signatures, fields


def verify_root_rotation(current: TrustRoot, document: bytes) -> TrustRoot:
    """Accept root metadata version ``current.version + 1`` and return the new trust root.

    The new key set must be signed by the threshold of the CURRENT keys (authorisation) and by the
    threshold of the NEW keys (proof that their holders have them).

    Raises:
        RootRotationError: too large, malformed, not the next version, or either threshold not met.
    """
    signed, signatures, fields = _parse_root(document)
    expected = current.version + 1
    if fields.version != expected:
        raise RootRotationError(f"root metadata has version {fields.version}, expected {expected}")
    signed_bytes = canonical_bytes(signed)
    old_signers = _valid_signers(signed_bytes, signatures, current.keys)
    if len(old_signers) < current.threshold:
        raise RootRotationError(f"root {fields.version} has {len(old_signers)} valid signature(s) by the "
                                f"current keys, {current.threshold} required")
    new_signers = _valid_signers(signed_bytes, signatures, fields.keys)
    if len(new_signers) < fields.threshold:
        raise RootRotationError(f"root {fields.version} has {len(new_signers)} valid signature(s) by its "
                                f"own new keys, {fields.threshold} required")
    return TrustRoot(keys=fields.keys, threshold=fields.threshold, version=fields.version)


def verify_genesis_root(document: bytes) -> TrustRoot:
    """Check root metadata version 1 (the genesis root): signed by the threshold of its own keys.

    Devices do not need this (their configured keys are version 1); tools use it to check a genesis
    file before writing it.

    Raises:
        RootRotationError: too large, malformed, not version 1, or its own threshold not met.
    """
    signed, signatures, fields = _parse_root(document)
    if fields.version != 1:
        raise RootRotationError(f"genesis root must have version 1, not {fields.version}")
    signers = _valid_signers(canonical_bytes(signed), signatures, fields.keys)
    if len(signers) < fields.threshold:
        raise RootRotationError(f"genesis root has {len(signers)} valid signature(s) by its own keys, "
                                f"{fields.threshold} required")
    return TrustRoot(keys=fields.keys, threshold=fields.threshold, version=1)


def update_trust_root(current: TrustRoot, documents: Mapping[int, bytes]) -> TrustRoot:
    """Walk root versions ``current.version + 1``, ``+ 2`` ... while present; return the newest.

    Documents at or below ``current.version`` are ignored; the walk stops at the first missing
    version.

    Raises:
        RootRotationError: any link of the chain fails :func:`verify_root_rotation`.
    """
    trust = current
    while trust.version + 1 in documents:
        trust = verify_root_rotation(trust, documents[trust.version + 1])
    return trust


class TreeVerdict(NamedTuple):
    """What :func:`verify_tree` accepted: the release and the trust root it was verified with."""

    release: VerifiedRelease
    trust: TrustRoot


def root_documents(files: Mapping[str, bytes]) -> dict[int, bytes]:
    """Return the root metadata files ``.fleet/root/<N>.json`` of a release tree, by version."""
    documents: dict[int, bytes] = {}
    prefix = ROOT_DIR.rstrip("/") + "/"
    for path, data in files.items():
        if path.startswith(prefix) and path.endswith(".json"):
            stem = path[len(prefix):-len(".json")]
            if stem.isdigit():
                documents[int(stem)] = data
    return documents


def tree_index(files: Mapping[str, bytes]) -> dict[str, tuple[str, int]]:
    """Return repo path -> (SHA-256 hex, size) of every file, the input of :func:`check_tree`."""
    return {path: (hashlib.sha256(data).hexdigest(), len(data)) for path, data in files.items()}


def verify_tree(files: Mapping[str, bytes], trust_root: TrustRoot, *, now: datetime,
                floor: int) -> TreeVerdict:
    """Verify a whole release tree and return the verified release and the (rotated) trust root.

    First the root rotations the tree carries (``.fleet/root/<N>.json`` above ``trust_root``'s
    version, walked one version at a time), then the signed manifest at ``.fleet/release.json``
    against the resulting trust root, then every file of the tree against the manifest.

    Args:
        files: every file of the release commit, repo path -> content (untrusted), manifest included.
        trust_root: the trust root the caller holds.
        now: the current time (timezone-aware).
        floor: the highest rollback floor verified so far (0 if none).

    Raises:
        RootRotationError: a root file of the chain is invalid.
        UntrustedKeyError: the tree has no manifest, or no trusted key signed it.
        ManifestTooLarge, ManifestError, PathError, ThresholdError, ExpiredError, RollbackError: as
            :func:`verify_release`.
        FileMissing, UnlistedFile, FileHashMismatch: as :func:`check_tree`.
        ValueError: ``now`` is naive.
    """
    _require_aware(now)
    rotations = {v: d for v, d in root_documents(files).items() if v > trust_root.version}
    trust = update_trust_root(trust_root, rotations) if rotations else trust_root
    manifest = files.get(MANIFEST_PATH)
    if manifest is None:
        raise UntrustedKeyError(f"the release has no signed manifest at {MANIFEST_PATH}")
    release = verify_release(manifest, trust, now=now, floor=floor, max_bytes=MAX_MANIFEST_BYTES)
    check_tree(release, tree_index(files))
    return TreeVerdict(release, trust)
