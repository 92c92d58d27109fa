"""The ``directory`` driver: make sure a directory exists with the declared mode/owner/group.

Plan: ``create`` (with any missing parents, which are listed in the change's paths so that an
undo removes them again) or ``attrs``. A mode that is not declared is 0755 for a new directory and
left alone on an existing one. An existing non-directory at the path is refused
(:class:`ConfinementError`).

Prune: a directory that existed before the agent managed it gets its original attributes back;
one the agent created is removed only when it is empty. A non-empty one is left in place with a
warning in the log (its content is not ours to delete: other resources or the device put it there).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, spec_digest
from edge_agent.drivers.file import Accounts, missing_parents, resolve_accounts
from edge_agent.errors import ApplyError
from edge_core.errors import ConfinementError
from edge_core.resources import Directory, Resource

if TYPE_CHECKING:
    from edge_agent.fsafe import Entry

__all__ = ["DirectoryDriver", "DirectoryObserved"]

log = logging.getLogger(__name__)

_DEFAULT_DIR_MODE = 0o755


@dataclass(frozen=True)
class DirectoryObserved:
    """The lstat of the directory (``None`` when absent), missing ancestors, resolved accounts."""

    entry: Entry | None
    missing_parents: tuple[str, ...] = ()
    accounts: Accounts = field(default_factory=Accounts)


class DirectoryDriver(Driver):
    """Directories."""

    kind: ClassVar[str] = "directory"

    def _observe(self, res: Resource, ctx: Context) -> DirectoryObserved:
        """Look at the directory of ``res``.

        Raises:
            ConfinementError: something other than a directory is there, or it is behind a symlink.
        """
        assert isinstance(res, Directory)
        entry = ctx.fs.lstat(res.path)
        accounts = resolve_accounts(res.owner, res.group)
        if entry is None:
            return DirectoryObserved(None, missing_parents(ctx.fs, res.path), accounts)
        if entry.kind != "dir":
            raise ConfinementError(f"{res.path} is a {entry.kind}, not a directory; refusing to manage it")
        return DirectoryObserved(entry, (), accounts)

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan ``create`` or ``attrs`` (pure)."""
        assert isinstance(res, Directory)
        assert isinstance(observed, DirectoryObserved)
        acc = observed.accounts
        note = f" ({acc.error}; will fail)" if acc.error else ""
        data: dict[str, Any] = {"path": res.path, "uid": acc.uid, "gid": acc.gid}
        if acc.error:
            data["account_error"] = acc.error
        entry = observed.entry
        if entry is None:
            mode = _DEFAULT_DIR_MODE if res.mode is None else res.mode
            data.update(mode=mode, expected=f"directory mode {mode:04o}", found="missing")
            summary = f"create directory {res.path} (mode {mode:04o}){note}"
            return [Change(res.id, self.kind, "create", summary,
                           paths=(*observed.missing_parents, res.path), data=data)]
        drift = acc.drift_of(entry, res.mode)
        if not drift:
            return []
        data.update(mode=res.mode, expected=f"directory mode {(res.mode or entry.mode):04o}",
                    found=f"directory mode {entry.mode:04o} uid {entry.uid} gid {entry.gid}")
        return [Change(res.id, self.kind, "attrs", f"set attributes of {res.path}: {', '.join(drift)}{note}",
                       paths=(res.path,), data=data)]

    def _apply(self, change: Change, ctx: Context) -> None:
        """Create the directory, set its attributes, or (prune) remove it if empty / restore it.

        Raises:
            ApplyError: an unknown account, or the OS refused.
        """
        data = change.data
        path = str(data.get("path"))
        if change.action in ("create", "attrs"):
            if data.get("account_error"):
                raise ApplyError(f"cannot apply {change.resource_id}: {data['account_error']}")
            if change.action == "create":
                ctx.fs.make_dir(path, mode=data.get("mode"), uid=data.get("uid"), gid=data.get("gid"))
            else:
                ctx.fs.set_attrs(path, mode=data.get("mode"), uid=data.get("uid"), gid=data.get("gid"))
        elif change.action == "delete":
            self._remove_if_empty(path, ctx)
        elif change.action == "restore":
            self.restore_change(change, ctx)
        else:
            raise self.unsupported(change)

    @staticmethod
    def _remove_if_empty(path: str, ctx: Context) -> None:
        try:
            ctx.fs.remove(path)
        except ApplyError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.ENOTEMPTY, errno.EEXIST):
                log.warning("left directory %s in place: it is no longer managed but not empty", path)
                return
            raise

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return the path and the declared attributes."""
        assert isinstance(res, Directory)
        spec = {"kind": self.kind, "path": res.path, "mode": res.mode, "owner": res.owner, "group": res.group}
        return spec, spec_digest(spec)
