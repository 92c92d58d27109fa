"""The fetch and verify steps of a sync: the fetched commit becomes a verified release or an error.

Trust-root rotations under ``.fleet/root/`` first, then the manifest signature threshold, expiry
and rollback floor, then every file of the tree against the manifest (all in
:func:`edge_core.trust.verify.verify_tree`); with ``trust.allowed_signers`` the commit's SSH
signature before that. A daemon's :class:`SyncCache` skips re-verifying a commit it verified
under the same trust root (expiry and the floor are still checked every time).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from edge_agent.prefetch import Prefetched
from edge_agent.runtime import Runtime
from edge_agent.state import StateDB
from edge_core.errors import ConfigError, StateError
from edge_core.logs import log_context
from edge_core.release import DesiredState
from edge_core.trust.verify import TrustRoot, VerifiedRelease, recheck_release, tree_index, verify_tree

__all__ = ["SyncCache", "Verified", "fetch_and_verify", "persist_trust", "stored_trust", "tree_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verified:
    """A fetched commit whose tree passed every trust check, with the trust root it was checked by."""

    commit: str
    release: VerifiedRelease
    tree: Mapping[str, bytes]
    trust: TrustRoot
    trust_changed: bool


@dataclass
class SyncCache:
    """What a long-running daemon keeps between syncs: the last verified commit and its desired state.

    When the mirror still points at that commit and the trust root is unchanged, a sync skips
    re-reading, re-hashing, re-verifying and re-parsing the tree; expiry and the rollback floor are
    checked again every time.
    """

    verified: Verified | None = None
    desired: DesiredState | None = None


def stored_trust(rt: Runtime) -> TrustRoot:
    """The trust root to verify with: the persisted one once it was rotated, else the config's.

    Until the fleet rotates its keys the config file is the source of truth (so an operator can
    re-provision a device by editing agent.yaml); after a verified rotation the persisted root wins.

    Raises:
        StateError: the persisted root is malformed.
    """
    data = rt.state.trust_root()
    if data:
        try:
            stored = TrustRoot(keys=frozenset(str(k) for k in data["keys"]), threshold=int(data["threshold"]),
                               version=int(data["version"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"the stored trust root is malformed: {exc}") from exc
        if stored.version > 1:
            return stored
    return TrustRoot(keys=frozenset(rt.config.trust.keys), threshold=rt.config.trust.threshold)


def tree_digest(tree: Mapping[str, bytes]) -> str:
    """Return one digest of a tree's paths, file digests and sizes (to notice a changed cache)."""
    h = hashlib.sha256()
    for path, (digest, size) in sorted(tree_index(tree).items()):
        h.update(f"{path}\0{digest}\0{size}\n".encode())
    return h.hexdigest()


def fetch_and_verify(rt: Runtime, want: str | None, now: datetime, seen: list[str] | None = None, *,
                     cache: SyncCache | None = None, prefetched: Prefetched | None = None) -> Verified:
    """Fetch ``want``, then verify the tree completely (``seen`` receives the fetched commit).

    With a ``cache`` holding this very commit under the same trust root, only expiry and the
    rollback floor are checked again. ``prefetched``, when it fetched this very ``want``, stands for
    the fetch (:mod:`edge_agent.prefetch`).

    Raises:
        FetchError: the mirror cannot be reached or refuses.
        UntrustedInputError: the release fails verification.
        ConfigError: ``trust.allowed_signers`` cannot be read.
    """
    ready = prefetched is not None and prefetched.want == want
    fetched = prefetched.get() if prefetched is not None and ready else rt.source.fetch(want)
    if seen is not None:
        seen.append(fetched.commit)
    hit = None if cache is None else cache.verified
    if hit is not None and hit.commit == fetched.commit and hit.trust == stored_trust(rt):
        recheck_release(hit.release, now=now, floor=rt.state.floor())
        return hit
    with log_context(commit=fetched.commit):
        if rt.config.trust.allowed_signers is not None:
            _check_commit_signature(rt, fetched.commit)
        tree = rt.source.read_tree(fetched.commit)
        current = stored_trust(rt)
        release, trust = verify_tree(tree, current, now=now, floor=rt.state.floor())
    return Verified(commit=fetched.commit, release=release, tree=tree, trust=trust,
                    trust_changed=trust != current)


def _check_commit_signature(rt: Runtime, commit: str) -> None:
    """Require an SSH signature on ``commit`` by a key of ``trust.allowed_signers`` (opt-in).

    Raises:
        ConfigError: the allowed-signers file cannot be read or parsed.
        SignatureError, UntrustedKeyError: the commit is unsigned, badly signed, or by another key.
    """
    from edge_core.trust.sshsig import parse_allowed_signers, verify_commit  # noqa: PLC0415 - opt-in

    path = rt.config.trust.allowed_signers
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"trust.allowed_signers: cannot read {path}: {exc.strerror}") from exc
    signer = verify_commit(rt.source.commit_raw(commit), parse_allowed_signers(text))
    log.info("commit %s is signed by %s", commit, signer)


def persist_trust(state: StateDB, verified: Verified) -> None:
    """Persist a rotated trust root (and record the rotation) once its release is accepted."""
    if verified.trust_changed:
        t = verified.trust
        state.set_trust_root({"keys": sorted(t.keys), "threshold": t.threshold, "version": t.version})
        state.add_event("trust_rotated", {"version": t.version, "threshold": t.threshold,
                                          "keys": len(t.keys)})
        log.info("trust root rotated to version %s", t.version)
