"""Fetching releases from a Git mirror into a local cache (dulwich, with gitfetch and gittransport).

The cache is a bare repository in ``cache_dir``. ``Source.fetch`` asks the mirror for one revision
(the commit the fleet server assigned, else the branch head) with a shallow fetch (``depth``, 1 by
default) and offers the commits the cache already holds as "haves", so only missing objects travel.

Guarantees:

* The pack is spooled to an anonymous temporary file while it arrives, counted, and the download is
  aborted as soon as it exceeds ``max_bytes``. Only a complete pack whose checksum and every object
  verify is moved into the object store (dulwich's ``add_thin_pack`` writes the pack and its index
  under a temporary name and renames them in last), and refs move only after that. A refused,
  truncated or corrupt pack therefore leaves the cache exactly as it was.
* Any commit sha is fetchable when the mirror allows it (``uploadpack.allowAnySHA1InWant`` or
  ``allowReachableSHA1InWant``; protocol v2 servers allow reachable shas by default). When the
  mirror refuses the want, ``fetch`` falls back to fetching the branch head ``fallback_depth``
  commits deep and looks for the sha there; it raises FetchError when it is not found.
* A sha already present in the cache is answered from the cache without contacting the mirror
  (objects are content-addressed, so a present commit cannot be stale).
* Before any signature check, a hostile mirror is bounded (:mod:`edge_core.gitlimits`): the
  whole fetch ends by ``limits.fetch_deadline``, the ref advertisement is capped in lines and bytes,
  and the spooled pack is walked object by object, refusing an object over ``max_object_bytes`` or
  a pack inflating past ``max_inflated_bytes`` from the headers, before dulwich inflates anything
  whole. A ``file://`` mirror's objects are checked from their headers the same way, and a tree
  entry whose object is not of the type the entry says is refused.
* Every fetch holds the cache's fetch lock (``cache_dir/fetch.lock``), so one process at a time
  writes the cache; :meth:`Source.clear_stale_locks` removes lock files only while holding it.
* Every dulwich, socket and OS failure leaves as :class:`FetchError` with a one-line reason that
  names the mirror URL (credentials removed); malformed trees raise :class:`FileIntegrityError`.

Transports, authentication and timeouts: :mod:`edge_core.gittransport`; one transfer from the mirror
and the reason of each way it fails: :mod:`edge_core.gitfetch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dulwich.errors import NotGitRepository
from dulwich.file import FileLocked
from dulwich.objects import Blob, Commit, ObjectID, Tree
from dulwich.refs import Ref
from dulwich.repo import Repo

from edge_core.errors import FetchError, FileIntegrityError
from edge_core.gitfetch import (
    Mirror,
    WantRefused,
    fetch_failure,
    has_commit,
    ingest,
    transfer,
    transfer_local,
)
from edge_core.gitlimits import CorruptObject, Deadline, FetchLimits, HeaderReader, fetch_lock
from edge_core.gittransport import PackSpool, SourceAuth, is_own_bug, redact
from edge_core.text import one_line

__all__ = ["FetchLimits", "FetchResult", "MiB", "Source", "SourceAuth"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_BRANCH_RE = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)[A-Za-z0-9._/-]+(?<![/.])$")
_LAST_FETCHED_REF = Ref(b"refs/edge-fleet/last-fetched")
_MODE_TREE = 0o040000
_MODE_SYMLINK = 0o120000
_MODE_GITLINK = 0o160000
FETCH_LOCK = "fetch.lock"


@dataclass(frozen=True)
class FetchResult:
    """What one fetch did.

    Attributes:
        commit: hex sha of the fetched revision (now in the cache).
        bytes_received: pack bytes that came over the wire (0 when up to date).
        up_to_date: the cache already held the revision; nothing was transferred.
    """

    commit: str
    bytes_received: int
    up_to_date: bool


class Source:
    """A Git mirror and the local cache its releases are fetched into.

    Args:
        url: ``file://`` URL or plain path, ``git://``, ``http(s)://`` or ``ssh://`` URL.
        branch: the branch whose head is fetched when no revision is assigned.
        cache_dir: where the bare cache repository lives (created on first use).
        max_bytes: largest pack accepted from the mirror in one fetch.
        depth: history depth fetched (1 = only the wanted commit; 0 = full history).
        auth: credentials, see :class:`SourceAuth`.
        timeout: seconds allowed for connecting and for each read.
        fallback_depth: how deep to fetch the branch when the mirror refuses a want by sha.
        limits: inflate, ref advertisement and deadline bounds of every fetch (see
            :mod:`edge_core.gitlimits`); ``max_object_bytes`` also caps every file ``read_tree``
            loads.

    Raises:
        ValueError: an argument is out of range or the URL scheme is not supported.
    """

    def __init__(self, url: str, branch: str, cache_dir: Path, *, max_bytes: int = 256 * MiB,
                 depth: int = 1, auth: SourceAuth | None = None, timeout: float = 30.0,
                 fallback_depth: int = 256, limits: FetchLimits | None = None) -> None:
        if not _BRANCH_RE.match(branch) or branch.endswith(".lock"):
            raise ValueError(f"invalid branch name {branch!r}")
        if max_bytes <= 0 or depth < 0 or timeout <= 0 or fallback_depth < 1:
            raise ValueError("max_bytes and timeout must be positive, depth >= 0, fallback_depth >= 1")
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("", "file", "git", "http", "https", "ssh"):
            raise ValueError(f"unsupported mirror URL scheme {scheme!r}")
        if scheme == "ssh" and (auth is None or auth.ssh_known_hosts is None):
            raise ValueError("an ssh:// mirror needs auth.ssh_known_hosts to pin its host key")
        self.url = url
        self.branch = branch
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.depth = depth
        self.auth = auth or SourceAuth()
        self.timeout = timeout
        self.fallback_depth = fallback_depth
        self.limits = limits or FetchLimits()
        self._deadline = Deadline(self.limits)
        self._display_url = redact(url)
        self._mirror = Mirror(url=url, display_url=self._display_url, branch=branch,
                              branch_ref=self._branch_ref, scheme=scheme, auth=self.auth,
                              timeout=timeout, limits=self.limits, max_bytes=max_bytes)
        self._repo: Repo | None = None

    # -- cache --------------------------------------------------------------------------------

    def _open_repo(self) -> Repo:
        if self._repo is not None:
            return self._repo
        try:
            if not (self.cache_dir / "HEAD").exists():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                self._deadline = Deadline(self.limits)
                with self._fetch_lock(wait=True):  # creating the cache writes it like a fetch
                    if not (self.cache_dir / "HEAD").exists():
                        with contextlib.closing(Repo.init_bare(str(self.cache_dir))) as new:
                            new.refs.set_symbolic_ref(Ref(b"HEAD"), self._branch_ref)
            repo = Repo(str(self.cache_dir))
        except (OSError, NotGitRepository, ValueError, KeyError) as exc:
            raise FetchError(f"cache repository unusable: {one_line(exc)} ({self.cache_dir})") from exc
        self._repo = repo
        return repo

    @property
    def _branch_ref(self) -> Ref:
        return Ref(b"refs/heads/" + self.branch.encode("utf-8"))

    def _local_haves(self, repo: Repo) -> list[ObjectID]:
        haves: list[ObjectID] = []
        for ref in (self._branch_ref, _LAST_FETCHED_REF):
            try:
                sha = repo.refs[ref]
            except KeyError:
                continue
            if sha not in haves and has_commit(repo, sha):
                haves.append(sha)
        return haves

    # -- fetch --------------------------------------------------------------------------------

    def fetch(self, want: str | None = None) -> FetchResult:
        """Bring one revision into the cache: ``want`` (a commit sha) or else the branch head.

        The whole call holds the cache's fetch lock (``cache_dir/fetch.lock``; waiting for another
        fetch counts against ``fetch_deadline``) and ends by the deadline. Lock files a killed
        fetch left are not removed here: see :meth:`clear_stale_locks`.

        Returns:
            The fetched commit, the pack bytes received and whether the cache was already current.

        Raises:
            FetchError: the mirror is unreachable, refuses or fails, the pack is over ``max_bytes``,
                truncated or corrupt, breaks one of ``limits``, or the revision does not exist
                there. The cache is unchanged.
        """
        want_sha: ObjectID | None = None
        if want is not None:
            if not _SHA_RE.match(want):
                raise FetchError(f"assigned revision is not a full lowercase commit sha: {want[:60]!r}")
            want_sha = ObjectID(want.encode("ascii"))
        repo = self._open_repo()
        self._deadline = Deadline(self.limits)
        with self._fetch_lock(wait=True):
            return self._fetch_locked(repo, want, want_sha)

    def import_bundle(self, path: Path) -> FetchResult:
        """Bring the one release commit of a ``git bundle`` file (``fleetctl release export``) into
        the cache, as a fetch would: under the fetch lock, within ``max_bytes`` and every fetch limit,
        the pack checked before anything is kept.

        Returns:
            The bundle's commit and its pack bytes.

        Raises:
            FetchError: the file cannot be read, is not a git bundle, carries more than one commit,
                needs a commit the cache lacks, or its pack is over a limit, corrupt or does not
                hold the commit. The cache is unchanged.
        """
        from edge_core.gitbundle import read_header  # noqa: PLC0415 - only an imported file needs it

        where = f"bundle {path}"
        repo = self._open_repo()
        self._deadline = Deadline(self.limits)
        mirror = dataclasses.replace(self._mirror, url=str(path), display_url=where, scheme="file")
        with self._fetch_lock(wait=True):
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed below, after the pack is spooled
            except OSError as exc:
                raise FetchError(f"cannot read {where}: {exc.strerror or exc}") from exc
            spool = PackSpool(Path(repo.object_store.path), self.max_bytes, self._deadline)
            try:
                with fh:
                    header = read_header(fh, where)
                    commits = set(header.references.values())
                    if len(commits) != 1:
                        raise FetchError(f"{where}: carries {len(commits)} commits, a release is one")
                    missing = [p for p in header.prerequisites
                               if not has_commit(repo, ObjectID(p.encode("ascii")))]
                    if missing:
                        raise FetchError(f"{where}: needs commit {missing[0]}, which this device does not "
                                         "have (export the release with its history)")
                    while chunk := fh.read(1 << 16):
                        spool.write(chunk)
                ingest(mirror, repo, spool, self._deadline)
            except FetchError:
                raise
            except Exception as exc:  # limits and a corrupt pack surface as several types
                if is_own_bug(exc):
                    raise
                raise fetch_failure(mirror, exc, None) from exc
            finally:
                spool.close()
            target = ObjectID(commits.pop().encode("ascii"))
            if not has_commit(repo, target):
                raise FetchError(f"{where}: its pack does not hold commit {target.decode('ascii')}")
            self._set_ref(repo, _LAST_FETCHED_REF, target)
            log.info("imported %s from %s: %d pack bytes", target.decode("ascii"), path, spool.size)
            return FetchResult(target.decode("ascii"), spool.size, False)

    def _fetch_lock(self, *, wait: bool) -> contextlib.AbstractContextManager[bool]:
        return fetch_lock(self.cache_dir / FETCH_LOCK, self._deadline, wait=wait)

    def _fetch_locked(self, repo: Repo, want: str | None, want_sha: ObjectID | None) -> FetchResult:
        if want_sha is not None and has_commit(repo, want_sha):
            self._set_ref(repo, _LAST_FETCHED_REF, want_sha)
            return FetchResult(want_sha.decode("ascii"), 0, True)
        try:
            return self._fetch_once(repo, want_sha, self.depth or None, deepen=False)
        except WantRefused as exc:
            assert want_sha is not None
            log.info("mirror refused a want by sha; fetching %s %d deep to find %s (%s)",
                     self.branch, self.fallback_depth, want, self._display_url)
            head = self._fetch_once(repo, None, max(self.fallback_depth, self.depth), deepen=True)
            if not has_commit(repo, want_sha):
                raise FetchError(
                    f"revision {want} not found in the last {self.fallback_depth} commits of "
                    f"{self.branch} and the mirror refuses fetching it by sha ({self._display_url})"
                ) from exc
            self._set_ref(repo, _LAST_FETCHED_REF, want_sha)
            return FetchResult(want_sha.decode("ascii"), head.bytes_received, False)

    def _fetch_once(self, repo: Repo, want: ObjectID | None, depth: int | None, *,
                    deepen: bool) -> FetchResult:
        object_dir = Path(repo.object_store.path)
        spool = PackSpool(object_dir, self.max_bytes, self._deadline)
        haves = self._local_haves(repo)
        try:
            if self._mirror.scheme in ("", "file") and depth == 1 and not deepen:
                target, requested, shallow = transfer_local(self._mirror, repo, want, spool=spool,
                                                            haves=haves, deadline=self._deadline)
            else:
                target, requested, shallow = transfer(self._mirror, repo, want, depth=depth, deepen=deepen,
                                                      spool=spool, haves=haves, deadline=self._deadline)
            if requested and spool.size:
                ingest(self._mirror, repo, spool, self._deadline)
        except (FetchError, WantRefused):
            raise
        except Exception as exc:  # dulwich raises many unrelated types; translate all but our bugs
            if is_own_bug(exc):
                raise
            raise fetch_failure(self._mirror, exc, want) from exc
        finally:
            spool.close()
        if not has_commit(repo, target):
            raise FetchError(f"mirror did not send commit {target.decode('ascii')} ({self._display_url})")
        if requested:
            try:
                repo.update_shallow(*shallow)
            except FileLocked as exc:
                raise FetchError("cannot record shallow commits in the cache: it is locked "
                                 f"({exc.lockfilename!r})") from exc
            except OSError as exc:
                raise FetchError(f"cannot record shallow commits in the cache: {one_line(exc)}") from exc
        if want is None:
            self._set_ref(repo, self._branch_ref, target)
        self._set_ref(repo, _LAST_FETCHED_REF, target)
        received = spool.size if requested else 0
        log.debug("fetched %s: %d pack bytes from %s", target, received, self._display_url)
        return FetchResult(target.decode("ascii"), received, not requested)

    @staticmethod
    def _set_ref(repo: Repo, ref: Ref, sha: ObjectID) -> None:
        try:
            repo.refs[ref] = sha
        except FileLocked as exc:
            raise FetchError(f"cannot update {ref.decode()} in the cache: it is locked ({exc.lockfilename!r})"
                             ) from exc
        except OSError as exc:
            raise FetchError(f"cannot update {ref.decode()} in the cache: {one_line(exc)}") from exc

    def clear_stale_locks(self) -> list[str]:
        """Remove the lock files a killed fetch left in the cache (ref, packed-refs, shallow and
        HEAD locks); return their paths relative to the cache.

        It takes the cache's fetch lock (every fetch holds it), so no other process is using the
        cache: every lock file found was left by a process that died holding it, and would refuse
        every later fetch. When a fetch is running it removes nothing (its locks are live).

        Raises:
            FetchError: a lock file cannot be removed.
        """
        self._open_repo()
        with self._fetch_lock(wait=False) as held:
            return self._clear_stale_locks() if held else []

    def _clear_stale_locks(self) -> list[str]:
        refs = self.cache_dir / "refs"
        found = list(refs.rglob("*.lock")) if refs.is_dir() else []
        found += [self.cache_dir / n for n in ("packed-refs.lock", "shallow.lock", "HEAD.lock")
                  if (self.cache_dir / n).exists()]
        removed = []
        for path in found:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise FetchError(f"cannot remove the stale lock {path}: {exc.strerror or exc}") from exc
            removed.append(str(path.relative_to(self.cache_dir)))
        if removed:
            log.warning("removed stale lock file(s) left in the repository cache: %s", ", ".join(removed))
        return removed

    # -- reading ------------------------------------------------------------------------------

    def _commit(self, commit: str) -> Commit:
        if not _SHA_RE.match(commit):
            raise FetchError(f"not a full lowercase commit sha: {commit[:60]!r}")
        repo = self._open_repo()
        try:
            obj = repo.object_store[ObjectID(commit.encode("ascii"))]
        except KeyError as exc:
            raise FetchError(f"commit {commit} is not in the cache; fetch it first") from exc
        except Exception as exc:  # corrupt cache objects raise assorted dulwich errors
            if is_own_bug(exc):
                raise
            raise FetchError(f"cannot read commit {commit} from the cache: {one_line(exc)}") from exc
        if not isinstance(obj, Commit):
            raise FetchError(f"{commit} is a {obj.type_name.decode()}, not a commit")
        return obj

    def commit_raw(self, commit: str) -> bytes:
        """Return the raw commit object (headers, signature and message) for signature checks.

        Raises:
            FetchError: the commit is not in the cache.
        """
        return bytes(self._commit(commit).as_raw_string())

    def commit_time(self, commit: str) -> int:
        """Return the committer timestamp (seconds since the epoch) of ``commit``.

        Raises:
            FetchError: the commit is not in the cache.
        """
        return int(self._commit(commit).commit_time)

    def read_tree(self, commit: str, *, max_file_bytes: int = 16 * MiB, max_total_bytes: int = 256 * MiB,
                  max_files: int = 100_000) -> dict[str, bytes]:
        """Return every file of ``commit``'s tree as ``"dir/name" -> content``.

        Raises:
            FetchError: the commit or one of its objects is not in the cache.
            FileIntegrityError: the tree holds a symlink or submodule, a malformed name, a file
                over ``max_file_bytes`` (or ``limits.max_object_bytes``, whichever is smaller; the
                size is read from the object's header before it is inflated), more than
                ``max_files`` files or more than ``max_total_bytes`` in all.
        """
        max_file_bytes = min(max_file_bytes, self.limits.max_object_bytes)
        root = self._commit(commit).tree
        store = self._open_repo().object_store
        files: dict[str, bytes] = {}
        total = 0
        stack: list[tuple[str, ObjectID]] = [("", root)]
        with HeaderReader(store) as headers:
            while stack:
                prefix, tree_sha = stack.pop()
                self._check_size(headers, tree_sha, prefix or "/", self.limits.max_object_bytes)
                tree = self._load(store, tree_sha, Tree, prefix or "/")
                for entry in tree.iteritems():
                    name, mode, sha = entry.path, entry.mode, entry.sha
                    path = prefix + self._entry_name(name, prefix)
                    if stat.S_IFMT(mode) == _MODE_TREE:
                        stack.append((path + "/", sha))
                        continue
                    if mode == _MODE_GITLINK:
                        raise FileIntegrityError(f"submodule in the release tree cannot be verified: {path}")
                    if stat.S_IFMT(mode) == _MODE_SYMLINK:
                        raise FileIntegrityError(f"symlink in the release tree cannot be verified: {path}")
                    if not stat.S_ISREG(mode):
                        raise FileIntegrityError(
                            f"unsupported entry mode {mode:o} in the release tree: {path}")
                    if len(files) >= max_files:
                        raise FileIntegrityError(f"release tree has more than {max_files} files")
                    self._check_size(headers, sha, path, max_file_bytes)
                    data = self._load(store, sha, Blob, path).as_raw_string()
                    if len(data) > max_file_bytes:
                        raise FileIntegrityError(
                            f"{path} is {len(data)} bytes, over the {max_file_bytes} limit")
                    total += len(data)
                    if total > max_total_bytes:
                        raise FileIntegrityError(f"release tree is over the {max_total_bytes}-byte limit")
                    files[path] = bytes(data)
        return files

    @staticmethod
    def _entry_name(name: bytes, prefix: str) -> str:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileIntegrityError(f"tree entry name under {prefix or '/'} is not UTF-8") from exc
        if text in ("", ".", "..") or "/" in text or "\0" in text:
            raise FileIntegrityError(f"malformed tree entry name {text!r} under {prefix or '/'}")
        return text

    @staticmethod
    def _check_size(headers: HeaderReader, sha: ObjectID, where: str, limit: int) -> None:
        """Refuse ``sha`` when its header says it inflates past ``limit``, before inflating it."""
        try:
            header = headers.header(sha)
        except CorruptObject as exc:
            raise FetchError(f"cannot read {where} from the cache: {exc}") from exc
        if header is not None and header[1] > limit:
            raise FileIntegrityError(f"{where} is {header[1]} bytes, over the {limit} limit")

    @staticmethod
    def _load(store: Any, sha: ObjectID, kind: type[Any], where: str) -> Any:
        try:
            obj = store[sha]
        except KeyError as exc:
            raise FetchError(f"object {sha.decode('ascii')} for {where} is not in the cache") from exc
        except Exception as exc:  # corrupt cache objects raise assorted dulwich errors
            if is_own_bug(exc):
                raise
            raise FetchError(f"cannot read {where} from the cache: {one_line(exc)}") from exc
        if not isinstance(obj, kind):
            kind_name = kind.__name__.lower()
            raise FileIntegrityError(f"{where} is a {obj.type_name.decode()}, expected {kind_name}")
        return obj

    def close(self) -> None:
        """Release the cache repository's open files."""
        repo, self._repo = self._repo, None
        if repo is not None:
            repo.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

