"""The I/O side of signing: collect a config repo's files, write the release manifest and root files.

The pure parts (manifest format, signatures, verification) live in :mod:`edge_core.trust`; this
module reads the working tree, reads and writes ``.fleet/release.json`` and ``.fleet/root/<N>.json``
atomically, and turns what it finds into calls to those pure functions.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from edge_core.errors import FileIntegrityError, ManifestError, RootRotationError
from edge_core.paths import validate_repo_path
from edge_core.trust.canonical import canonical_bytes
from edge_core.trust.keys import SigningKey, format_verify_key
from edge_core.trust.manifest import (
    MANIFEST_PATH,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_ROOT_BYTES,
    ROOT_DIR,
    file_digest,
    parse_root_fields,
    parse_signed_document,
    root_path,
    signature_is_valid,
)
from edge_core.trust.verify import (
    TrustRoot,
    VerifiedRelease,
    check_tree,
    verify_genesis_root,
    verify_release,
    verify_root_rotation,
    verify_tree,
)
from fleet_server.authoring.manifest import (
    add_signatures,
    build_release,
    build_root,
    read_unverified,
    sign_document,
)
from fleet_server.errors import UsageError

__all__ = [
    "RootSummary",
    "collect_release_files",
    "cosign_release",
    "read_manifest",
    "read_root_documents",
    "rotate_root",
    "sign_release",
    "verify_repo",
    "write_atomic",
]

log = logging.getLogger(__name__)

_ROOT_NAME = re.compile(r"^([1-9][0-9]{0,8})\.json$")
_GIT_TIMEOUT_S = 120


def _is_git_work_tree(repo_dir: Path) -> bool:
    return (repo_dir / ".git").exists()


def _git_listed_paths(repo_dir: Path) -> list[str]:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo_dir), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True, timeout=_GIT_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise UsageError("git is not installed; it is needed to list the files of a work tree") from exc
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UsageError(f"git ls-files failed in {repo_dir}: {reason[0] if reason else exc.returncode}") \
            from exc
    except subprocess.TimeoutExpired as exc:
        raise UsageError(f"git ls-files timed out in {repo_dir}") from exc
    paths: list[str] = []
    for raw in proc.stdout.split(b"\0"):
        if raw:
            paths.append(_decode_name(raw))
    return sorted(set(paths))


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"file name is not UTF-8: {raw!r}") from exc


def _walk_paths(repo_dir: Path) -> list[str]:
    paths: list[str] = []
    root = os.fsencode(repo_dir)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        at_top = rel_dir == b"."
        if at_top:
            dirnames[:] = [d for d in dirnames if d != b".git"]
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                rel = _decode_name(os.path.relpath(full, root))
                raise UsageError(f"{rel} is a symlink; symlinks cannot be released safely")
        for name in filenames:
            if at_top and name == b".git":
                continue
            paths.append(_decode_name(os.path.relpath(os.path.join(dirpath, name), root)))
    return sorted(paths)


def _read_regular(repo_dir: Path, rel: str) -> bytes | None:
    """Read ``rel`` without following symlinks; None if it no longer exists."""
    full = repo_dir / rel
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{rel} is a symlink; symlinks cannot be released safely")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{rel} is not a regular file (a submodule or special file)")
    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def collect_release_files(repo_dir: Path) -> dict[str, bytes]:
    """Return every file of the config repo (repo path -> content), except the manifest itself.

    In a git work tree these are the files ``git ls-files --cached --others --exclude-standard``
    lists, read from the working tree (a listed but deleted file is skipped); elsewhere every regular
    file under ``repo_dir`` except ``.git/``.

    Raises:
        UsageError: ``repo_dir`` is not a directory, holds a symlink or special file, a non-UTF-8
            name, more than MAX_FILES files, or git failed.
        PathError: a file name is not a safe repo path.
    """
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise UsageError(f"{repo_dir} is not a directory")
    listed = _git_listed_paths(repo_dir) if _is_git_work_tree(repo_dir) else _walk_paths(repo_dir)
    files: dict[str, bytes] = {}
    for rel in listed:
        if rel == MANIFEST_PATH:
            continue
        validate_repo_path(rel)
        _refuse_symlinked_parents(repo_dir, rel)
        data = _read_regular(repo_dir, rel)
        if data is not None:
            files[rel] = data
        if len(files) > MAX_FILES:
            raise UsageError(f"{repo_dir} holds more than {MAX_FILES} files")
    return files


def _refuse_symlinked_parents(repo_dir: Path, rel: str) -> None:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        parent = repo_dir.joinpath(*parts[:i])
        if parent.is_symlink():
            raise UsageError(f"{'/'.join(parts[:i])} is a symlink; symlinks cannot be released safely")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_capped(path: Path, cap: int) -> bytes:
    """Read at most ``cap + 1`` bytes (so a size check after reading can still refuse)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(cap + 1)


def read_manifest(repo_dir: Path, *, max_bytes: int = MAX_MANIFEST_BYTES) -> bytes | None:
    """Return the bytes of the repo's release manifest, or None when there is none.

    At most ``max_bytes + 1`` bytes are read, so the verifier can refuse an oversized manifest.

    Raises:
        OSError: the manifest exists but cannot be read (or is a symlink).
    """
    path = Path(repo_dir) / MANIFEST_PATH
    if not path.exists() and not path.is_symlink():
        return None
    return _read_capped(path, max_bytes)


def _unique_keys(keys: Sequence[SigningKey]) -> list[SigningKey]:
    seen: dict[str, SigningKey] = {}
    for key in keys:
        seen.setdefault(format_verify_key(key.verify_key), key)
    return list(seen.values())


def sign_release(repo_dir: Path, keys: Sequence[SigningKey], *, expires: timedelta, now: datetime,
                 version: int | None = None, floor: int | None = None,
                 message: str | None = None) -> VerifiedRelease:
    """Sign the repo's files as a new release and write ``.fleet/release.json`` atomically.

    ``version`` defaults to the previous manifest's version + 1 (1 if none); ``floor`` defaults to
    the previous manifest's floor (1 if none). The written document is verified with the signing
    keys before this returns.

    Raises:
        UsageError: no key, a non-positive expiry, a version not above the previous one, or an
            unreadable tree (see :func:`collect_release_files`).
        ManifestError: the previous manifest is malformed, or the values are out of range.
        PathError: a file name is not a safe repo path.
    """
    repo_dir = Path(repo_dir)
    keys = _unique_keys(keys)
    if not keys:
        raise UsageError("at least one signing key is needed")
    if expires <= timedelta(0):
        raise UsageError("expiry must be in the future")
    previous = read_manifest(repo_dir)
    prev_version, prev_floor = 0, 1
    if previous is not None:
        prev = read_unverified(previous)
        prev_version, prev_floor = prev["version"], prev["rollback_floor"]
    new_version = prev_version + 1 if version is None else version
    if new_version <= prev_version:
        raise UsageError(f"version {new_version} is not above the previous release {prev_version}")
    new_floor = prev_floor if floor is None else floor
    if not 1 <= new_floor <= new_version:
        raise UsageError(f"rollback floor {new_floor} must be between 1 and the version {new_version}")
    files = collect_release_files(repo_dir)
    now = now.replace(microsecond=0)
    signed = build_release(files, version=new_version, rollback_floor=new_floor, created=now,
                           expires=now + expires, message=message)
    document = sign_document(signed, keys)
    trust = TrustRoot(frozenset(format_verify_key(k.verify_key) for k in keys), threshold=len(keys))
    release = verify_release(document, trust, now=now, floor=0)
    write_atomic(repo_dir / MANIFEST_PATH, document)
    log.info("signed release %s of %s with %s file(s), %s key(s)", new_version, repo_dir, len(files),
             len(keys))
    return release


def _tree_digests(files: dict[str, bytes]) -> dict[str, tuple[str, int]]:
    return {path: file_digest(data) for path, data in files.items()}


def cosign_release(repo_dir: Path, keys: Sequence[SigningKey], *, now: datetime) -> VerifiedRelease:
    """Add the signatures of ``keys`` to the repo's existing manifest (k-of-n signing by several people).

    The signed content is not changed. The result lists every valid signer of the document (not
    checked against any trust root: that is ``verify``'s job). Refused when the working tree no
    longer matches the manifest or the manifest has expired.

    Raises:
        UsageError: no manifest, no key, or the tree differs from the manifest (the reason names
            the first differing path).
        ExpiredError: the manifest has expired.
        ManifestError: the manifest is malformed.
    """
    repo_dir = Path(repo_dir)
    keys = _unique_keys(keys)
    if not keys:
        raise UsageError("at least one signing key is needed")
    document = read_manifest(repo_dir)
    if document is None:
        raise UsageError(f"no release manifest at {repo_dir / MANIFEST_PATH}; run 'fleetctl release sign'")
    cosigned = add_signatures(document, keys)
    signed, sigs = parse_signed_document(cosigned)
    signed_bytes = canonical_bytes(signed)
    valid = {signature_is_valid(signed_bytes, s) for s in sigs}
    everyone = TrustRoot(frozenset(k for k in valid if k is not None), threshold=1)
    release = verify_release(cosigned, everyone, now=now, floor=0)
    try:
        check_tree(release, _tree_digests(collect_release_files(repo_dir)))
    except FileIntegrityError as exc:
        raise UsageError(f"working tree no longer matches the manifest: {exc}") from exc
    write_atomic(repo_dir / MANIFEST_PATH, cosigned)
    log.info("co-signed release %s of %s; it now holds %s signature(s)", release.version, repo_dir,
             len(sigs))
    return release


def read_root_documents(repo_dir: Path) -> dict[int, bytes]:
    """Return the root metadata files ``.fleet/root/<N>.json`` of the repo, by version.

    Raises:
        UsageError: a root file is a symlink.
    """
    root_dir = Path(repo_dir) / ROOT_DIR
    documents: dict[int, bytes] = {}
    if not root_dir.is_dir():
        return documents
    for entry in sorted(root_dir.iterdir()):
        match = _ROOT_NAME.match(entry.name)
        if match is None:
            continue
        if entry.is_symlink():
            raise UsageError(f"{ROOT_DIR}/{entry.name} is a symlink")
        documents[int(match.group(1))] = _read_capped(entry, MAX_ROOT_BYTES)
    return documents


class RootSummary:
    """What :func:`rotate_root` wrote: the version, the file, the new key set and who signed."""

    def __init__(self, version: int, path: Path, keys: frozenset[str], threshold: int,
                 signers: frozenset[str]) -> None:
        self.version = version
        self.path = path
        self.keys = keys
        self.threshold = threshold
        self.signers = signers


def rotate_root(repo_dir: Path, new_keys: Sequence[str], *, threshold: int,
                signing_keys: Sequence[SigningKey]) -> RootSummary:
    """Write the next root metadata file ``.fleet/root/<N+1>.json`` signed by every signing key.

    With no root file yet, writes ``1.json``, the genesis root (it must be signed by the threshold of
    its own keys). Otherwise the new root must be signed by the threshold of root N's keys and the
    threshold of the new keys; it is checked before it is written.

    Raises:
        UsageError: no signing key was given.
        ManifestError: a new key is not a canonical ed25519 key, or the threshold is out of range.
        RootRotationError: the signatures given do not satisfy the rotation rules (nothing is
            written), or the newest existing root file is malformed.
    """
    repo_dir = Path(repo_dir)
    signing_keys = _unique_keys(signing_keys)
    if not signing_keys:
        raise UsageError("at least one signing key is needed")
    existing = read_root_documents(repo_dir)
    current_version = max(existing, default=0)
    signed = build_root(set(new_keys), threshold=threshold, version=current_version + 1)
    document = sign_document(signed, signing_keys)
    fields = parse_root_fields(signed)
    if current_version == 0:
        current = verify_genesis_root(document)
    else:
        try:
            prev_signed, _ = parse_signed_document(existing[current_version])
            prev = parse_root_fields(prev_signed)
        except ManifestError as exc:
            raise RootRotationError(f"{root_path(current_version)} is malformed: {exc}") from exc
        previous = TrustRoot(prev.keys, prev.threshold, version=current_version)
        current = verify_root_rotation(previous, document)
    path = repo_dir / root_path(current.version)
    write_atomic(path, document)
    signers = frozenset(format_verify_key(k.verify_key) for k in signing_keys)
    log.info("wrote root %s with %s key(s), threshold %s", current.version, len(fields.keys), threshold)
    return RootSummary(current.version, path, fields.keys, fields.threshold, signers)


def verify_repo(repo_dir: Path, trust: TrustRoot, *, now: datetime, floor: int) -> tuple[VerifiedRelease,
                                                                                        TrustRoot]:
    """Verify the repo's root rotations, manifest and files as a device would.

    Returns the verified release and the trust root it was verified with. The verification is the
    device's own (:func:`edge_core.trust.verify.verify_tree`) over the repo's files and manifest.

    Raises:
        UsageError: the files cannot be collected (see :func:`collect_release_files`).
        UntrustedKeyError: there is no manifest, or no trusted key signed it.
        RootRotationError: a root file in the chain is invalid.
        ManifestError, PathError, SignatureError, ExpiredError, RollbackError, FileIntegrityError:
            the release fails that check.
    """
    repo_dir = Path(repo_dir)
    files = collect_release_files(repo_dir)
    document = read_manifest(repo_dir)
    if document is not None:
        files[MANIFEST_PATH] = document
    return verify_tree(files, trust, now=now, floor=floor)
