"""One transfer from a Git mirror into a cache's object store, and the reason of every way it fails.

:class:`edge_core.source.Source` owns the cache (its refs, locks and reads); this module moves the
objects: the negotiation with a network mirror (:func:`transfer`), the depth-1 copy from a mirror
on this machine (:func:`transfer_local`), the check and move of the spooled pack into the object
store (:func:`ingest`), and :func:`fetch_failure`, which turns whatever dulwich, a socket or the OS
raised during a transfer into one :class:`FetchError` with a one-line reason naming the mirror.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dulwich.errors import GitProtocolError, HangupException, NotGitRepository
from dulwich.objects import Commit, ObjectID
from dulwich.pack import write_pack_from_container
from dulwich.refs import Ref
from dulwich.repo import Repo

from edge_core.errors import FetchError
from edge_core.gitlimits import CorruptObject, Deadline, FetchLimits, LimitExceeded, scan_pack
from edge_core.gittransport import (
    HaveWalker,
    PackSpool,
    PackTooLarge,
    SourceAuth,
    causes,
    is_own_bug,
    is_want_refused,
    transport_reason,
    tree_objects,
)
from edge_core.text import one_line

if TYPE_CHECKING:
    from dulwich.client import GitClient

__all__ = [
    "BranchMissing",
    "Mirror",
    "ShallowUpdate",
    "WantRefused",
    "fetch_failure",
    "has_commit",
    "ingest",
    "transfer",
    "transfer_local",
]

log = logging.getLogger(__name__)

ShallowUpdate = tuple[set[ObjectID] | None, set[ObjectID] | None]


class WantRefused(Exception):
    """The mirror does not allow fetching the wanted sha directly (the caller falls back)."""


class BranchMissing(Exception):
    """The mirror has no such branch."""


@dataclass(frozen=True)
class Mirror:
    """Where and how one transfer talks to the mirror.

    Attributes:
        url: the mirror URL as configured; ``display_url`` is the same without credentials.
        branch_ref: the ref of the followed branch.
        scheme: the URL's scheme, lower case (``""`` for a plain path).
        auth, timeout, limits: passed to the transport (:mod:`edge_core.gittransport`).
        max_bytes: the largest pack accepted.
    """

    url: str
    display_url: str
    branch: str
    branch_ref: Ref
    scheme: str
    auth: SourceAuth
    timeout: float
    limits: FetchLimits
    max_bytes: int


def has_commit(repo: Repo, sha: ObjectID) -> bool:
    """Whether ``repo``'s object store holds ``sha`` as a commit."""
    try:
        return sha in repo.object_store and isinstance(repo.object_store[sha], Commit)
    except (KeyError, ValueError, OSError):
        return False


def transfer(mirror: Mirror, repo: Repo, want: ObjectID | None, *, depth: int | None, deepen: bool,
             spool: PackSpool, haves: list[ObjectID],
             deadline: Deadline) -> tuple[ObjectID, bool, ShallowUpdate]:
    """Negotiate with a network mirror and spool the pack; return (target, pack requested, shallow).

    Raises:
        WantRefused: the mirror refused ``want`` by sha before sending any pack data.
        BranchMissing: the mirror has no such branch.
        Exception: whatever the transport raised; :func:`fetch_failure` gives its reason.
    """
    chosen: list[ObjectID] = []
    requested: list[bool] = []

    def determine_wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
        if len(refs) > mirror.limits.max_refs:
            raise mirror.limits.breach("max_refs", f"ref advertisement of {len(refs)} refs")
        target = want if want is not None else refs.get(mirror.branch_ref)
        if target is None:
            raise BranchMissing
        chosen.append(target)
        if has_commit(repo, target) and not deepen:
            return []
        requested.append(True)
        return [target]

    from edge_core.gitclients import make_client  # noqa: PLC0415 - the network clients, on first use

    client, path = make_client(mirror.url, mirror.auth, mirror.timeout, mirror.limits, deadline)
    try:
        walker = HaveWalker(haves, set(repo.get_shallow()))
        result = client.fetch_pack(path, determine_wants, walker, spool.write, depth=depth)
    except (HangupException, GitProtocolError, ConnectionError) as exc:
        # The mirror listed its refs, then failed before sending any pack data for a want by
        # sha: that is how git refuses an unadvertised sha ("not our ref", often as a reset).
        if want is not None and requested and spool.size == 0 and not deepen:
            raise WantRefused(one_line(exc)) from exc
        raise
    finally:
        _close_client(client)
    if not chosen:
        raise BranchMissing
    return chosen[0], bool(requested), (result.new_shallow, result.new_unshallow)


def _close_client(client: GitClient) -> None:
    """Close the client and the connections it opened (each of our clients closes its own)."""
    with contextlib.suppress(Exception):
        client.close()


def transfer_local(mirror: Mirror, repo: Repo, want: ObjectID | None, *, spool: PackSpool,
                   haves: list[ObjectID], deadline: Deadline) -> tuple[ObjectID, bool, ShallowUpdate]:
    """Depth-1 fetch from a repository on this machine: the wanted commit and the trees and
    blobs the cached commits lack (dulwich's own local upload-pack ignores haves when shallow).

    Raises:
        FetchError: no repository there, no such commit, or not a commit.
        BranchMissing: the mirror has no such branch.
    """
    path = urlsplit(mirror.url).path if mirror.scheme == "file" else mirror.url
    try:
        source = Repo(path)
    except NotGitRepository as exc:
        raise FetchError(f"no repository at the mirror URL ({mirror.display_url})") from exc
    with contextlib.closing(source):
        if want is None:
            try:
                target = source.refs[mirror.branch_ref]
            except KeyError as exc:
                raise BranchMissing from exc
        else:
            target = want
        if has_commit(repo, target):
            return target, False, (None, None)
        try:
            commit = source.object_store[target]
        except KeyError as exc:
            raise FetchError(
                f"mirror has no commit {target.decode('ascii')} ({mirror.display_url})"
            ) from exc
        if not isinstance(commit, Commit):
            raise FetchError(f"{target.decode('ascii')} is not a commit ({mirror.display_url})")
        present: set[ObjectID] = set()
        for have in haves:
            cached = repo.object_store[have]
            assert isinstance(cached, Commit)
            present |= tree_objects(repo.object_store, cached.tree, set(), mirror.limits, deadline)
        below = tree_objects(source.object_store, commit.tree, present, mirror.limits, deadline)
        todo: list[tuple[ObjectID, None]] = [(target, None), *((sha, None) for sha in below)]
        write_pack_from_container(spool.write, source.object_store, todo,
                                  object_format=source.object_format, other_haves=present)
        shallow: set[ObjectID] = {target} if commit.parents else set()
        return target, True, (shallow, set())


def ingest(mirror: Mirror, repo: Repo, spool: PackSpool, deadline: Deadline) -> None:
    """Verify the spooled pack and move it into the object store; on failure leave nothing.

    Raises:
        FetchError: the pack is corrupt.
        LimitExceeded: the pack breaks one of the mirror's limits.
    """
    object_dir = Path(repo.object_store.path)
    before = {p.name for p in object_dir.glob("tmp_pack_*")}
    spool.file.seek(0)
    try:
        stats = scan_pack(spool.file, mirror.limits, deadline)  # before anything is inflated whole
    except CorruptObject as exc:
        raise FetchError(f"corrupt pack from mirror: {exc} ({mirror.display_url})") from exc
    log.debug("pack of %d objects inflating to %d bytes", stats.objects, stats.inflated)
    spool.file.seek(0)
    try:
        repo.object_store.add_thin_pack(spool.file.read, None)
    except Exception as exc:  # a corrupt pack surfaces as many dulwich/zlib types
        if is_own_bug(exc):
            raise
        for leftover in object_dir.glob("tmp_pack_*"):
            if leftover.name not in before:
                leftover.unlink(missing_ok=True)
        raise FetchError(
            f"corrupt pack from mirror: {type(exc).__name__}: {one_line(exc)} ({mirror.display_url})"
        ) from exc


def _is_unauthorized(exc: Exception) -> bool:
    """Whether ``exc`` is dulwich's HTTP 401 (known by name: only a network client, imported by
    then, raises it; a local fetch need not import the clients to tell)."""
    return any(t.__name__ == "HTTPUnauthorized" and t.__module__ == "dulwich.client"
               for t in type(exc).__mro__)


def fetch_failure(mirror: Mirror, exc: Exception, want: ObjectID | None) -> FetchError | WantRefused:
    """Return the error a failed transfer leaves as: a :class:`FetchError` with a one-line reason
    naming the mirror, or :class:`WantRefused` when the mirror refused ``want`` by sha."""
    display = mirror.display_url
    if isinstance(exc, LimitExceeded):
        return FetchError(f"{exc} ({display})")
    if isinstance(exc, PackTooLarge):
        return FetchError(f"pack from mirror exceeds the {mirror.max_bytes}-byte limit ({display})")
    if isinstance(exc, BranchMissing):
        return FetchError(f"mirror has no branch {mirror.branch!r} ({display})")
    if _is_unauthorized(exc):
        return FetchError(f"mirror refused the credentials (HTTP 401) ({display})")
    if isinstance(exc, NotGitRepository):
        return FetchError(f"no repository at the mirror URL ({display})")
    breach = next((c for c in causes(exc) if isinstance(c, LimitExceeded)), None)
    if breach is not None:
        return FetchError(f"{breach} ({display})")
    if want is not None and is_want_refused(exc):
        return WantRefused(str(exc))
    return FetchError(f"{transport_reason(exc, mirror.timeout)} ({display})")
