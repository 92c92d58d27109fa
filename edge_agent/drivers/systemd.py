"""The ``systemd_unit`` driver: unit file, enabled state, running state.

Observe: the unit file (when the resource declares one) through ``ctx.fs`` under ``res.unit_dir``,
and ``systemctl is-enabled NAME`` / ``systemctl is-active NAME``.

Plan, in this order: the unit file (``create``/``update``/``attrs``, mode 0644 when new); a
``daemon-reload`` when its content changed; ``enable``/``disable`` per ``res.enabled``;
``start``/``stop`` per ``res.running``, or a ``restart`` when the unit file changed while the unit
runs (and ``running`` is not false). Unit-file states that cannot be toggled (``static``,
``indirect``, ``generated``, ``transient``) are left alone. ``enabled``/``running`` left undeclared
are not enforced.

A ``restart`` change runs ``systemctl try-restart NAME``: the unit is restarted only if it is
running at that moment. The engine produces such changes for ``watch`` (see :func:`restart_change`).

Backups: unit-file changes are captured by ``ctx.fs``; the undo of such a record restores the file
and runs ``daemon-reload``. ``enable``/``disable``/``start``/``stop``/``restart`` record
``{"type": "unit_state", "name", "enabled", "active"}``, whose undo brings the enabled and active
state back (a ``restart`` is not repeated on undo: restarting the unit after files were restored is
the engine's job). ``daemon-reload`` records nothing.

Probe: ``systemctl`` must be on PATH and, when the device root is ``/``, ``/run/systemd/system``
must exist (systemd is the running init).

Prune: stop and disable the unit when the agent created its unit file (or restore the enabled and
active state it had before the agent managed it), then delete the unit file the agent created or
restore the original one, and reload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, is_absent_record, path_prune_changes, spec_digest
from edge_agent.drivers.file import FileObserved, apply_file_change, content_changes, observe_file, payload_of
from edge_agent.errors import ApplyError
from edge_core.resources import Resource, SystemdUnit

if TYPE_CHECKING:
    from edge_agent.runner import RunResult
    from edge_agent.state import Managed

__all__ = ["SystemdDriver", "SystemdObserved", "UnitState", "read_unit_state", "restart_change"]

log = logging.getLogger(__name__)

_QUERY_TIMEOUT = 15.0
_ACTION_TIMEOUT = 120.0
_ENABLED = frozenset({"enabled", "enabled-runtime", "linked", "linked-runtime", "alias"})
_FIXED = frozenset({"static", "indirect", "generated", "transient"})
_ACTIVE = frozenset({"active", "activating", "reloading"})
_VERBS = {"enable": "enable", "disable": "disable", "start": "start", "stop": "stop",
          "restart": "try-restart"}


@dataclass(frozen=True)
class UnitState:
    """What systemctl says about a unit: ``is-enabled`` and ``is-active`` words."""

    enabled: str
    active: str

    @property
    def is_enabled(self) -> bool:
        """True when the unit is enabled (or linked/aliased)."""
        return self.enabled in _ENABLED

    @property
    def fixed(self) -> bool:
        """True when the enabled state cannot be toggled (static, indirect, generated, transient)."""
        return self.enabled in _FIXED

    @property
    def is_active(self) -> bool:
        """True when the unit is active (or activating, reloading)."""
        return self.active in _ACTIVE


@dataclass(frozen=True)
class SystemdObserved:
    """The unit file (``None`` when the resource declares none) and the unit's state."""

    file: FileObserved | None
    state: UnitState


def _systemctl(ctx: Context, verb: str, *names: str, timeout: float = _ACTION_TIMEOUT) -> RunResult:
    """``systemctl VERB -- NAMES``: a unit name never reads as an option."""
    return ctx.runner.run(["systemctl", verb, *(("--", *names) if names else ())], timeout=timeout)


def _first_word(text: str, default: str) -> str:
    words = text.split()
    return words[0] if words else default


def read_unit_state(name: str, ctx: Context) -> UnitState:
    """Ask systemctl whether unit ``name`` is enabled and active (``not-found``/``unknown`` if silent).

    Raises:
        ApplyError: systemctl cannot be run.
    """
    enabled = _systemctl(ctx, "is-enabled", name, timeout=_QUERY_TIMEOUT)
    active = _systemctl(ctx, "is-active", name, timeout=_QUERY_TIMEOUT)
    return UnitState(_first_word(enabled.stdout, "not-found"), _first_word(active.stdout, "unknown"))


def restart_change(res: SystemdUnit, reason: str = "") -> Change:
    """Return the ``restart`` change of ``res`` (``systemctl try-restart``), e.g. for a watch."""
    why = f" ({reason})" if reason else ""
    return Change(res.id, SystemdDriver.kind, "restart", f"restart {res.name} if running{why}",
                  data={"name": res.name})


class SystemdDriver(Driver):
    """systemd units."""

    kind: ClassVar[str] = "systemd_unit"

    def probe(self, ctx: Context) -> str | None:
        """Need systemctl on PATH, and a running systemd when the device root is ``/``."""
        if ctx.runner.which("systemctl") is None:
            return "systemctl not found on PATH"
        if ctx.fs.root == Path("/") and not Path("/run/systemd/system").is_dir():
            return "systemd is not running here (no /run/systemd/system)"
        return None

    def _observe(self, res: Resource, ctx: Context) -> SystemdObserved:
        """Observe the unit file and the unit's enabled/active state.

        Raises:
            ConfinementError: the unit file path is unsafe.
            ApplyError: systemctl cannot be run.
        """
        assert isinstance(res, SystemdUnit)
        unit_path = res.unit_path
        file = None
        if unit_path is not None:
            file = observe_file(ctx.fs, unit_path, payload_of(res.id, ctx), read_content=ctx.diffs)
        return SystemdObserved(file, read_unit_state(res.name, ctx))

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan unit file, daemon-reload, enable/disable, start/stop/restart (pure)."""
        assert isinstance(res, SystemdUnit)
        assert isinstance(observed, SystemdObserved)
        changes: list[Change] = []
        unit_path = res.unit_path
        if unit_path is not None and observed.file is not None:
            changes += content_changes(res.id, self.kind, unit_path, payload_of(res.id, ctx), observed.file,
                                       mode=None, extra={"name": res.name}, diffs=ctx.diffs)
        content_changed = any(c.action in ("create", "update") for c in changes)
        data = {"name": res.name}
        if content_changed:
            changes.append(Change(res.id, self.kind, "daemon-reload", "systemctl daemon-reload", data=data))
        state = observed.state
        if res.enabled is True and not state.is_enabled and not state.fixed:
            changes.append(Change(res.id, self.kind, "enable", f"enable {res.name}",
                                  data={**data, "expected": "enabled", "found": state.enabled}))
        elif res.enabled is False and state.is_enabled:
            changes.append(Change(res.id, self.kind, "disable", f"disable {res.name}",
                                  data={**data, "expected": "disabled", "found": state.enabled}))
        if res.running is True and not state.is_active:
            changes.append(Change(res.id, self.kind, "start", f"start {res.name}",
                                  data={**data, "expected": "active", "found": state.active}))
        elif res.running is False and state.is_active:
            changes.append(Change(res.id, self.kind, "stop", f"stop {res.name}",
                                  data={**data, "expected": "inactive", "found": state.active}))
        elif content_changed and state.is_active:
            changes.append(restart_change(res, "unit file changed"))
        return changes

    def _apply(self, change: Change, ctx: Context) -> None:
        """Write the unit file, reload, or run one systemctl verb.

        Raises:
            ApplyError: systemctl failed (exit code and last line of its error output), or the
                unit file could not be written.
        """
        action = change.action
        if action in ("create", "update"):
            apply_file_change(change, ctx, payload_of(change.resource_id, ctx))
        elif action == "attrs":
            apply_file_change(change, ctx, None)
        elif action == "daemon-reload":
            _check(_systemctl(ctx, "daemon-reload"), "daemon-reload")
        elif action in _VERBS:
            name = str(change.data["name"])
            _check(_systemctl(ctx, _VERBS[action], name), f"{_VERBS[action]} {name}")
        elif action == "delete":
            ctx.fs.remove(str(change.data["path"]))
        elif action == "restore":
            self.restore_change(change, ctx)
        else:
            raise self.unsupported(change)

    def _snapshot(self, change: Change, ctx: Context) -> list[dict[str, Any]]:
        """Capture the unit file, or record the unit's enabled/active state before a verb."""
        if change.action in _VERBS:
            name = str(change.data["name"])
            state = read_unit_state(name, ctx)
            return [{"type": "unit_state", "name": name,
                     "enabled": None if state.fixed or state.enabled == "not-found" else state.is_enabled,
                     "active": state.is_active}]
        if change.action == "daemon-reload":
            return []
        return super()._snapshot(change, ctx)

    def _undo(self, record: Any, ctx: Context) -> None:
        """Bring back a unit's enabled/active state, or restore a unit file and reload.

        Raises:
            ApplyError: systemctl failed, or the file cannot be restored.
        """
        if record.get("type") == "unit_state":
            name = str(record["name"])
            now = read_unit_state(name, ctx)
            enabled, active = record.get("enabled"), record.get("active")
            if enabled is True and not now.is_enabled:
                _check(_systemctl(ctx, "enable", name), f"enable {name}")
            elif enabled is False and now.is_enabled:
                _check(_systemctl(ctx, "disable", name), f"disable {name}")
            if active is True and not now.is_active:
                _check(_systemctl(ctx, "start", name), f"start {name}")
            elif active is False and now.is_active:
                _check(_systemctl(ctx, "stop", name), f"stop {name}")
            return
        super()._undo(record, ctx)
        _check(_systemctl(ctx, "daemon-reload"), "daemon-reload")

    def prune(self, managed: Managed, ctx: Context) -> list[Change]:
        """Stop/disable (or restore the prior state), then remove or restore the unit file."""
        spec, rid, original = managed.spec, managed.resource_id, managed.original
        name = str(spec.get("name", ""))
        unit_path = spec.get("unit_path")
        if not name:
            return []
        prior = original if original is not None and original.get("type") == "unit_state" else None
        created_file = (original is not None and is_absent_record(original)
                        and original.get("path") == unit_path)
        if prior is not None:
            want_enabled, want_active = prior.get("enabled"), prior.get("active")
        elif created_file:
            want_enabled, want_active = False, False
        else:
            want_enabled = want_active = None
        state = read_unit_state(name, ctx)
        data = {"name": name}
        changes: list[Change] = []
        if want_active is False and state.is_active:
            changes.append(Change(rid, self.kind, "stop", f"stop {name} (no longer managed)", data=data))
        elif want_active is True and not state.is_active:
            changes.append(Change(rid, self.kind, "start", f"start {name} (as before it was managed)",
                                  data=data))
        if want_enabled is False and state.is_enabled:
            changes.append(Change(rid, self.kind, "disable", f"disable {name} (no longer managed)",
                                  data=data))
        elif want_enabled is True and not state.is_enabled and not state.fixed:
            changes.append(Change(rid, self.kind, "enable", f"enable {name} (as before it was managed)",
                                  data=data))
        if isinstance(unit_path, str):
            file_changes = path_prune_changes(rid, self.kind, unit_path, original, ctx)
            if file_changes:
                changes += file_changes
                changes.append(Change(rid, self.kind, "daemon-reload", "systemctl daemon-reload", data=data))
        return changes

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return name, unit file path and digest, and the declared enabled/running state."""
        assert isinstance(res, SystemdUnit)
        unit_sha = sha256(payload_of(res.id, ctx)).hexdigest() if res.unit_path else None
        spec = {"kind": self.kind, "name": res.name, "unit_path": res.unit_path, "unit_sha256": unit_sha,
                "enabled": res.enabled, "running": res.running, "watch": list(res.watch)}
        return spec, spec_digest(spec)


def _check(result: RunResult, what: str) -> None:
    if result.timed_out:
        raise ApplyError(f"systemctl {what} timed out")
    if result.returncode != 0:
        line = result.last_error_line()
        raise ApplyError(f"systemctl {what} failed with exit code {result.returncode}"
                         f"{': ' + line if line else ''}")
