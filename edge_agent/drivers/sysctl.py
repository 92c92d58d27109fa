"""The ``sysctl`` driver: a kernel parameter, set now and (when ``persist``) in a sysctl.d drop-in.

Observe: ``sysctl -n NAME``; values are compared with whitespace normalised (``"1 2"`` equals
``"1\\t2"``). A parameter that cannot be read does not fail the plan: the ``set`` change shows
the reason, and applying it fails (``sysctl -w`` refuses), so the transaction rolls back.

Plan: ``set`` (``sysctl -w NAME=VALUE``), then the drop-in ``res.persist_path`` holding
``NAME = VALUE\\n`` (``create``/``update``, mode 0644) through ``ctx.fs``.

Backups: ``set`` records ``{"type": "sysctl", "name", "value"}`` (the value before the change),
whose undo sets it back; the drop-in is captured by ``ctx.fs``.

Prune: the runtime value the parameter had before the agent first changed it is set back, and the
drop-in (named by the agent, ``60-edge-fleet-NAME.conf``) is deleted, or restored when it existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, is_absent_record, spec_digest
from edge_agent.drivers.file import FileObserved, apply_file_change, content_changes, observe_file
from edge_agent.errors import ApplyError
from edge_core.resources import Resource, Sysctl

if TYPE_CHECKING:
    from edge_agent.state import Managed

__all__ = ["SysctlDriver", "SysctlObserved", "dropin_content", "normalise", "read_sysctl"]

_TIMEOUT = 15.0


@dataclass(frozen=True)
class SysctlObserved:
    """The current value (``None`` when unreadable, with ``error``) and the drop-in file."""

    value: str | None
    error: str | None = None
    file: FileObserved | None = None


def normalise(value: str) -> str:
    """Return ``value`` with runs of whitespace collapsed to one space and the ends stripped."""
    return " ".join(value.split())


def dropin_content(name: str, value: str) -> bytes:
    """Return the sysctl.d drop-in that sets ``name`` to ``value``."""
    return f"{name} = {value}\n".encode()


def read_sysctl(name: str, ctx: Context) -> tuple[str | None, str | None]:
    """Return ``(normalised value, None)``, or ``(None, reason)`` when it cannot be read.

    Raises:
        ApplyError: sysctl cannot be run.
    """
    result = ctx.runner.run(["sysctl", "-n", "--", name], timeout=_TIMEOUT)
    if result.ok:
        return normalise(result.stdout), None
    return None, result.last_error_line() or f"sysctl -n {name} exited {result.returncode}"


class SysctlDriver(Driver):
    """Kernel parameters."""

    kind: ClassVar[str] = "sysctl"

    def probe(self, ctx: Context) -> str | None:
        """Need ``sysctl`` on PATH."""
        return None if ctx.runner.which("sysctl") else "sysctl not found on PATH"

    def _observe(self, res: Resource, ctx: Context) -> SysctlObserved:
        """Read the current value and the drop-in file.

        Raises:
            ApplyError: sysctl cannot be run.
            ConfinementError: the drop-in path is unsafe.
        """
        assert isinstance(res, Sysctl)
        value, error = read_sysctl(res.name, ctx)
        path = res.persist_path
        file = (observe_file(ctx.fs, path, dropin_content(res.name, res.value), read_content=ctx.diffs)
                if path else None)
        return SysctlObserved(value, error, file)

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan ``set`` and the drop-in changes (pure)."""
        assert isinstance(res, Sysctl)
        assert isinstance(observed, SysctlObserved)
        changes: list[Change] = []
        want = normalise(res.value)
        if observed.value != want:
            found = observed.value if observed.value is not None else f"unreadable ({observed.error})"
            changes.append(Change(res.id, self.kind, "set", f"set {res.name} = {want} (now {found})",
                                  data={"name": res.name, "value": want, "expected": want, "found": found}))
        path = res.persist_path
        if path and observed.file is not None:
            changes += content_changes(res.id, self.kind, path, dropin_content(res.name, want), observed.file,
                                       mode=None, extra={"name": res.name, "value": want}, diffs=ctx.diffs)
        return changes

    def _apply(self, change: Change, ctx: Context) -> None:
        """Run ``sysctl -w``, or write / delete / restore the drop-in.

        Raises:
            ApplyError: sysctl refused the value, or the file write failed.
        """
        data = change.data
        if change.action == "set":
            _write(str(data["name"]), str(data["value"]), ctx)
        elif change.action in ("create", "update"):
            apply_file_change(change, ctx, dropin_content(str(data["name"]), str(data["value"])))
        elif change.action == "attrs":
            apply_file_change(change, ctx, None)
        elif change.action == "delete":
            ctx.fs.remove(str(data["path"]))
        elif change.action == "restore":
            self.restore_change(change, ctx)
        else:
            raise self.unsupported(change)

    def _snapshot(self, change: Change, ctx: Context) -> list[dict[str, Any]]:
        """Record the current value before ``set``; capture the drop-in otherwise."""
        if change.action == "set":
            name = str(change.data["name"])
            value, _ = read_sysctl(name, ctx)
            return [{"type": "sysctl", "name": name, "value": value}]
        return super()._snapshot(change, ctx)

    def _undo(self, record: Any, ctx: Context) -> None:
        """Set a recorded value back (nothing when it was unreadable), or restore the drop-in.

        Raises:
            ApplyError: sysctl refused the value, or the restore failed.
        """
        if record.get("type") == "sysctl":
            if record.get("value") is not None:
                _write(str(record["name"]), str(record["value"]), ctx)
            return
        super()._undo(record, ctx)

    def prune(self, managed: Managed, ctx: Context) -> list[Change]:
        """Set the pre-agent value back and delete (or restore) the drop-in."""
        spec, rid, original = managed.spec, managed.resource_id, managed.original
        name = str(spec.get("name", ""))
        changes: list[Change] = []
        if original is not None and original.get("type") == "sysctl" and original.get("value") is not None:
            old = str(original["value"])
            current, _ = read_sysctl(name, ctx)
            if current != normalise(old):
                changes.append(Change(rid, self.kind, "set", f"set {name} = {old} (as before it was managed)",
                                      data={"name": name, "value": old}))
        path = spec.get("persist_path")
        if isinstance(path, str) and ctx.fs.lstat(path) is not None:
            if original is not None and original.get("path") == path and not is_absent_record(original):
                changes.append(Change(rid, self.kind, "restore", f"restore the original {path}",
                                      paths=(path,), data={"path": path, "record": dict(original)}))
            else:
                changes.append(Change(rid, self.kind, "delete", f"delete {path} (no longer managed)",
                                      paths=(path,), data={"path": path}))
        return changes

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return name, value and the drop-in path."""
        assert isinstance(res, Sysctl)
        spec = {"kind": self.kind, "name": res.name, "value": normalise(res.value),
                "persist_path": res.persist_path}
        return spec, spec_digest(spec)


def _write(name: str, value: str, ctx: Context) -> None:
    result = ctx.runner.run(["sysctl", "-w", "--", f"{name}={value}"], timeout=_TIMEOUT)
    if not result.ok:
        why = "timed out" if result.timed_out else f"failed with exit code {result.returncode}"
        line = result.last_error_line()
        raise ApplyError(f"sysctl -w {name} {why}{': ' + line if line else ''}")
