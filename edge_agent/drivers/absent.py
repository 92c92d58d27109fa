"""The ``absent`` driver: make sure nothing exists at a path.

Plan: ``delete`` when something is there — a file or symlink is removed, a directory with its
whole tree (never following symlinks inside it). The backup of a delete is recursive, so an undo
brings the whole tree back. A FIFO, socket or device at (or below) the path is refused by the
backup (:class:`ConfinementError`), so nothing is removed that could not be restored.

Prune: dropping an ``absent`` resource from the release changes nothing on the device: what it
removed stays removed (the operator wanted it gone; bringing it back would be a surprise). Its
backups serve only the rollback of the transaction that removed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, spec_digest
from edge_core.resources import Absent, Resource

if TYPE_CHECKING:
    from edge_agent.fsafe import Entry
    from edge_agent.state import Managed

__all__ = ["AbsentDriver", "AbsentObserved"]


@dataclass(frozen=True)
class AbsentObserved:
    """The lstat of the path, ``None`` when nothing is there."""

    entry: Entry | None


class AbsentDriver(Driver):
    """Paths that must not exist."""

    kind: ClassVar[str] = "absent"

    def _observe(self, res: Resource, ctx: Context) -> AbsentObserved:
        """Look at the path of ``res``.

        Raises:
            ConfinementError: a parent of the path is a symlink.
        """
        assert isinstance(res, Absent)
        return AbsentObserved(ctx.fs.lstat(res.path))

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan one ``delete`` when something is at the path (pure)."""
        assert isinstance(res, Absent)
        assert isinstance(observed, AbsentObserved)
        entry = observed.entry
        if entry is None:
            return []
        what = "directory tree" if entry.kind == "dir" else entry.kind
        return [Change(res.id, self.kind, "delete", f"delete {what} {res.path}", paths=(res.path,),
                       data={"path": res.path, "found_kind": entry.kind, "expected": "missing",
                             "found": f"{entry.kind} mode {entry.mode:04o}"})]

    def _apply(self, change: Change, ctx: Context) -> None:
        """Remove whatever is at the path (recursively for a directory).

        Raises:
            ApplyError: the OS refused.
        """
        if change.action != "delete":
            raise self.unsupported(change)
        ctx.fs.remove_tree(str(change.data["path"]))

    def prune(self, managed: Managed, ctx: Context) -> list[Change]:
        """Return ``[]``: what an absent resource removed stays removed (module docstring)."""
        return []

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return the path."""
        assert isinstance(res, Absent)
        spec = {"kind": self.kind, "path": res.path}
        return spec, spec_digest(spec)
