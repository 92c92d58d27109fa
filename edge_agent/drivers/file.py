"""The ``file`` driver, and the helpers every kind that writes a regular file shares.

Observe: ``lstat`` + SHA-256 through ``ctx.fs``; the current content is read only when its digest
differs from the desired payload and it is small (< 256 KiB), to show a diff, and only for a plan
that is shown (``ctx.diffs``: a sync plans without diffs). An unchanged file costs one ``lstat``
and one hash, no subprocess, no re-read.

Plan: ``create`` (missing), ``update`` (content differs; a unified diff capped at 200 lines,
``binary content differs (N bytes)`` for binary content), ``attrs`` (only mode/owner/group differ).
A declared mode is enforced; an undeclared one is 0644 for a new file and left alone on an existing
file. Owner and group names are resolved on the host running the agent (``pwd``/``grp``) at observe
time. A name unknown on the device does NOT fail the plan: the plan shows the change marked
``owner 'x' unknown on this device``, and applying it raises :class:`ApplyError`, so the
transaction rolls back and the device reports the reason.

A target that is a directory, symlink or special file is refused with :class:`ConfinementError`.
Missing parent directories are created by the write (mode 0755); they are listed in the change's
paths so that the backup records them as absent and an undo removes them again.
"""

from __future__ import annotations

import grp
import hashlib
import posixpath
import pwd
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, spec_digest
from edge_agent.errors import ApplyError
from edge_core.errors import ConfinementError, DriverError
from edge_core.paths import is_under
from edge_core.resources import File, Resource

if TYPE_CHECKING:
    from edge_agent.fsafe import Entry, FsRoot

__all__ = [
    "DIFF_MAX_LINES",
    "DIFF_READ_MAX",
    "Accounts",
    "FileDriver",
    "FileObserved",
    "apply_file_change",
    "content_changes",
    "describe",
    "missing_parents",
    "observe_file",
    "payload_of",
    "resolve_accounts",
    "short_digest",
    "text_diff",
]

DIFF_READ_MAX = 256 * 1024
"""Current content larger than this is not read for a diff."""

DIFF_MAX_LINES = 200
"""Diff lines shown at most per change."""

_DEFAULT_FILE_MODE = 0o644


@dataclass(frozen=True)
class Accounts:
    """Desired owner and group resolved to ids (``None`` = not declared, or unknown)."""

    uid: int | None = None
    gid: int | None = None
    error: str | None = None

    def drift_of(self, entry: Entry, mode: int | None) -> list[str]:
        """How ``entry``'s mode, owner and group differ from ``mode`` and these ids (empty: none).

        An account that cannot be resolved counts as a difference, so the change is planned and
        fails with that reason.
        """
        drift = []
        if mode is not None and entry.mode != mode:
            drift.append(f"mode {entry.mode:04o} -> {mode:04o}")
        if self.uid is not None and entry.uid != self.uid:
            drift.append(f"uid {entry.uid} -> {self.uid}")
        if self.gid is not None and entry.gid != self.gid:
            drift.append(f"gid {entry.gid} -> {self.gid}")
        if self.error:
            drift.append(self.error)
        return drift


@dataclass(frozen=True)
class FileObserved:
    """What is at a file path now.

    Attributes:
        entry: the lstat of the path, ``None`` when absent.
        sha256: hex digest of the current content (``None`` when absent).
        content: the current content when it differs from desired and is small; else ``None``.
        missing_parents: absent ancestor directories, topmost first (only when the path is absent).
        accounts: the declared owner/group resolved on this device.
    """

    entry: Entry | None
    sha256: str | None
    content: bytes | None = None
    missing_parents: tuple[str, ...] = ()
    accounts: Accounts = field(default_factory=Accounts)


def short_digest(hexdigest: str | None) -> str:
    """Return the first 12 hex digits of a digest (``-`` for none)."""
    return hexdigest[:12] if hexdigest else "-"


def resolve_accounts(owner: str | None, group: str | None) -> Accounts:
    """Resolve ``owner``/``group`` names (or numeric ids) with the host's account database."""
    uid: int | None = None
    gid: int | None = None
    errors: list[str] = []
    if owner is not None:
        if owner.isdigit():
            uid = int(owner)
        else:
            try:
                uid = pwd.getpwnam(owner).pw_uid
            except KeyError:
                errors.append(f"owner {owner!r} unknown on this device")
    if group is not None:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                errors.append(f"group {group!r} unknown on this device")
    return Accounts(uid, gid, "; ".join(errors) or None)


def missing_parents(fs: FsRoot, path: str) -> tuple[str, ...]:
    """Return the ancestors of ``path`` inside the allowed roots that do not exist, topmost first.

    Raises:
        ConfinementError: an ancestor is reached through a symlink.
    """
    missing: list[str] = []
    parent = posixpath.dirname(path)
    while parent != "/" and is_under(parent, fs.allowed_roots) and fs.lstat(parent) is None:
        missing.append(parent)
        parent = posixpath.dirname(parent)
    return tuple(reversed(missing))


def observe_file(fs: FsRoot, path: str, desired: bytes | None,
                 accounts: Accounts | None = None, *, read_content: bool = True) -> FileObserved:
    """Observe the regular file at ``path``; read its content only if it differs and is small (and
    ``read_content``: a plan without diffs never needs it).

    Raises:
        ConfinementError: the path is a directory, symlink or special file, or behind a symlink.
        ApplyError: the OS refused.
    """
    accounts = accounts or Accounts()
    entry, digest = fs.observe(path)
    if entry is None:
        return FileObserved(None, None, None, missing_parents(fs, path), accounts)
    if entry.kind != "file":
        raise ConfinementError(f"{path} is a {entry.kind}, not a regular file; refusing to manage it")
    content = None
    if (read_content and desired is not None and entry.size <= DIFF_READ_MAX
            and digest != hashlib.sha256(desired).hexdigest()):
        content = fs.read_file(path, max_bytes=DIFF_READ_MAX)
    return FileObserved(entry, digest, content, (), accounts)


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def text_diff(path: str, old: bytes | None, new: bytes, *, old_size: int = 0) -> str:
    """Return a unified diff of ``old`` -> ``new`` (capped), or a one-line note for binary/large.

    ``old`` is ``None`` when the current content was not read (too large); ``b""`` for a new file.
    """
    if old is None:
        return f"content differs ({old_size} bytes now, {len(new)} bytes desired; too large to diff)"
    if not (_is_text(old) and _is_text(new)):
        return f"binary content differs ({len(new)} bytes)"
    import difflib  # noqa: PLC0415 - only a plan that is shown renders diffs

    lines = list(difflib.unified_diff(
        old.decode("utf-8").splitlines(keepends=True), new.decode("utf-8").splitlines(keepends=True),
        fromfile=f"a{path}", tofile=f"b{path}",
    ))
    lines = [ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n" for ln in lines]
    if len(lines) > DIFF_MAX_LINES:
        more = len(lines) - DIFF_MAX_LINES
        lines = [*lines[:DIFF_MAX_LINES], f"... ({more} more diff lines)\n"]
    return "".join(lines)


def describe(sha: str | None, mode: int | None, uid: int | None = None, gid: int | None = None) -> str:
    """Return a short description of file state for drift reports (``missing`` when no digest)."""
    if sha is None and mode is None:
        return "missing"
    parts = [f"sha256 {short_digest(sha)}"] if sha is not None else []
    if mode is not None:
        parts.append(f"mode {mode:04o}")
    if uid is not None:
        parts.append(f"uid {uid}")
    if gid is not None:
        parts.append(f"gid {gid}")
    return " ".join(parts)


def content_changes(
    res_id: str, kind: str, path: str, desired: bytes, observed: FileObserved, *,
    mode: int | None, default_mode: int = _DEFAULT_FILE_MODE, secret: bool = False,
    desired_digest: str | None = None, extra: dict[str, Any] | None = None, diffs: bool = True,
) -> list[Change]:
    """Plan the create/update/attrs change that makes ``path`` hold ``desired`` (pure).

    Args:
        res_id: the resource id.
        kind: the resource kind (names the driver that applies the change).
        path: the device path.
        desired: the desired content (for secrets: only used for its size; never copied).
        observed: what :func:`observe_file` saw (for secrets ``sha256`` holds the keyed digest).
        mode: the declared mode, ``None`` when undeclared.
        default_mode: the mode of a new file when none is declared.
        secret: redact the diff and never describe the content.
        desired_digest: the digest to compare with ``observed.sha256`` (default: SHA-256 of desired).
        extra: more JSON-able keys for ``Change.data``.
        diffs: render the diff (``Change.diff``); without, it is ``""`` (a secret's stays redacted).
    """
    entry = observed.entry
    acc = observed.accounts
    want_sha = desired_digest if desired_digest is not None else hashlib.sha256(desired).hexdigest()
    note = f" ({acc.error}; will fail)" if acc.error else ""
    data: dict[str, Any] = {"path": path, "uid": acc.uid, "gid": acc.gid, **(extra or {})}
    if acc.error:
        data["account_error"] = acc.error
    if not secret:
        data["sha256"] = want_sha
    if entry is None:
        new_mode = default_mode if mode is None else mode
        data["mode"] = new_mode
        data["expected"] = _state_text(want_sha, new_mode, secret)
        data["found"] = "missing"
        diff = "(secret content redacted)" if secret else text_diff(path, b"", desired) if diffs else ""
        what = f"secret file {path} (" if secret else f"file {path} ({len(desired)} bytes,"
        return [Change(res_id, kind, "create", f"create {what} mode {new_mode:04o}){note}", diff,
                       (*observed.missing_parents, path), data)]
    new_mode = entry.mode if mode is None else mode
    data["mode"] = new_mode
    found = _state_text(observed.sha256, entry.mode, secret, entry.uid, entry.gid)
    if observed.sha256 != want_sha:
        data["expected"] = _state_text(want_sha, new_mode, secret)
        data["found"] = found
        if secret:
            diff, what = "(secret content redacted)", "secret content"
        else:
            diff = text_diff(path, observed.content, desired, old_size=entry.size) if diffs else ""
            what = "content"
        return [Change(res_id, kind, "update", f"update {what} of {path}{note}", diff, (path,), data)]
    drift = acc.drift_of(entry, mode)
    if not drift:
        return []
    data["expected"] = _state_text(want_sha, new_mode, secret, acc.uid, acc.gid)
    data["found"] = found
    return [Change(res_id, kind, "attrs", f"set attributes of {path}: {', '.join(drift)}{note}", "",
                   (path,), data)]


def _state_text(sha: str | None, mode: int, secret: bool, uid: int | None = None,
                gid: int | None = None) -> str:
    if secret:
        text = describe(None, mode, uid, gid)
        return f"secret content (redacted) {text}"
    return describe(sha, mode, uid, gid)


def apply_file_change(change: Change, ctx: Context, content: bytes | None) -> None:
    """Apply a create/update/attrs change planned by :func:`content_changes`.

    Args:
        change: the change.
        ctx: the driver context.
        content: the bytes to write (unused for ``attrs``).

    Raises:
        ApplyError: an unknown account, missing content, or the write failed.
        ConfinementError: the path became unsafe.
    """
    data = change.data
    if data.get("account_error"):
        raise ApplyError(f"cannot apply {change.resource_id}: {data['account_error']}")
    path = str(data["path"])
    mode = int(data["mode"])
    uid, gid = data.get("uid"), data.get("gid")
    if change.action == "attrs":
        ctx.fs.set_attrs(path, mode=mode, uid=uid, gid=gid)
        return
    if content is None:
        raise ApplyError(f"cannot write {path}: no content for {change.resource_id}")
    want = data.get("sha256")
    if want is not None and hashlib.sha256(content).hexdigest() != want:
        raise ApplyError(f"cannot write {path}: the payload of {change.resource_id} changed since the plan")
    ctx.fs.write_file(path, content, mode=mode, uid=uid, gid=gid)


def payload_of(res_id: str, ctx: Context) -> bytes:
    """Return the payload of ``res_id``.

    Raises:
        DriverError: the release carries no payload for it.
    """
    try:
        return ctx.payloads[res_id]
    except KeyError:
        raise DriverError(f"no payload for resource {res_id}") from None


class FileDriver(Driver):
    """Regular files with content from the release (already template-rendered)."""

    kind: ClassVar[str] = "file"

    def _observe(self, res: Resource, ctx: Context) -> FileObserved:
        """Observe the file of ``res`` (see the module docstring).

        Raises:
            ConfinementError: not a regular file, or behind a symlink.
            DriverError: no payload for the resource.
        """
        assert isinstance(res, File)
        return observe_file(ctx.fs, res.path, payload_of(res.id, ctx), resolve_accounts(res.owner, res.group),
                            read_content=ctx.diffs)

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan create/update/attrs for the file (pure)."""
        assert isinstance(res, File)
        return content_changes(res.id, self.kind, res.path, payload_of(res.id, ctx), observed, mode=res.mode,
                               diffs=ctx.diffs)

    def _apply(self, change: Change, ctx: Context) -> None:
        """Write, re-attribute, delete (prune) or restore (prune) the file.

        Raises:
            ApplyError: the change failed.
        """
        if change.action in ("create", "update"):
            apply_file_change(change, ctx, payload_of(change.resource_id, ctx))
        elif change.action == "attrs":
            apply_file_change(change, ctx, None)
        elif change.action == "delete":
            ctx.fs.remove(str(change.data["path"]))
        elif change.action == "restore":
            self.restore_change(change, ctx)
        else:
            raise self.unsupported(change)

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return the path, declared attributes and the payload's SHA-256."""
        assert isinstance(res, File)
        spec = {"kind": self.kind, "path": res.path, "mode": res.mode, "owner": res.owner, "group": res.group,
                "sha256": hashlib.sha256(payload_of(res.id, ctx)).hexdigest()}
        return spec, spec_digest(spec)

