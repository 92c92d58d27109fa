"""The ``symlink`` driver: make sure a path is a symbolic link with the declared target.

Plan: ``create`` (missing; missing parents are listed in the change's paths) or ``update`` (a
symlink with another target, or a regular file, is replaced atomically; the backup keeps what was
there). A directory or special file at the path is refused (:class:`ConfinementError`). The target
text is stored as given and never followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, spec_digest
from edge_agent.drivers.file import missing_parents
from edge_core.errors import ConfinementError
from edge_core.resources import Resource, Symlink

if TYPE_CHECKING:
    from edge_agent.fsafe import Entry

__all__ = ["SymlinkDriver", "SymlinkObserved"]


@dataclass(frozen=True)
class SymlinkObserved:
    """The lstat of the path (``None`` when absent) and its missing ancestors."""

    entry: Entry | None
    missing_parents: tuple[str, ...] = ()


class SymlinkDriver(Driver):
    """Symbolic links."""

    kind: ClassVar[str] = "symlink"

    def _observe(self, res: Resource, ctx: Context) -> SymlinkObserved:
        """Look at the path of ``res``.

        Raises:
            ConfinementError: a directory or special file is there, or a parent is a symlink.
        """
        assert isinstance(res, Symlink)
        entry = ctx.fs.lstat(res.path)
        if entry is None:
            return SymlinkObserved(None, missing_parents(ctx.fs, res.path))
        if entry.kind not in ("symlink", "file"):
            raise ConfinementError(f"{res.path} is a {entry.kind}; refusing to replace it with a symlink")
        return SymlinkObserved(entry)

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan ``create`` or ``update`` (pure)."""
        assert isinstance(res, Symlink)
        assert isinstance(observed, SymlinkObserved)
        entry = observed.entry
        data: dict[str, Any] = {"path": res.path, "target": res.target,
                                "expected": f"symlink -> {res.target}"}
        if entry is None:
            data["found"] = "missing"
            return [Change(res.id, self.kind, "create", f"create symlink {res.path} -> {res.target}",
                           paths=(*observed.missing_parents, res.path), data=data)]
        if entry.kind == "symlink" and entry.target == res.target:
            return []
        if entry.kind == "symlink":
            data["found"] = f"symlink -> {entry.target}"
            summary = f"retarget symlink {res.path}: {entry.target} -> {res.target}"
        else:
            data["found"] = f"regular file ({entry.size} bytes)"
            summary = f"replace regular file {res.path} with a symlink -> {res.target}"
        return [Change(res.id, self.kind, "update", summary, paths=(res.path,), data=data)]

    def _apply(self, change: Change, ctx: Context) -> None:
        """Make the link, or (prune) delete / restore it.

        Raises:
            ApplyError: the OS refused.
            ConfinementError: a directory or special file appeared at the path.
        """
        path = str(change.data.get("path"))
        if change.action in ("create", "update"):
            ctx.fs.make_symlink(path, str(change.data["target"]))
        elif change.action == "delete":
            ctx.fs.remove(path)
        elif change.action == "restore":
            self.restore_change(change, ctx)
        else:
            raise self.unsupported(change)

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return the path and the target."""
        assert isinstance(res, Symlink)
        spec = {"kind": self.kind, "path": res.path, "target": res.target}
        return spec, spec_digest(spec)
