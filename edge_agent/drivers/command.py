"""The ``command`` driver: run a command for what no other kind covers, guarded.

Guards, checked at observe time: ``creates`` (skip when that device path exists, looked up through
``ctx.fs``), ``unless`` (skip when it exits 0), ``onlyif`` (run only when it exits 0). Guards
should only read the device. Without guards a command runs on every sync; drift detection
therefore ignores commands.

A ``refresh_only`` command plans its ``run`` change like any other (guards still apply), tagged
``data["refresh_only"] = True``; the engine keeps it only when a watched resource changed.

Every command (and guard) runs through ``ctx.runner.run_release_command`` with ``res.timeout``:
working directory the device root, a clean environment (``PATH``, ``LANG``, ``EDGE_FLEET_ROOT``,
``EDGE_FLEET_DEVICE``, ``EDGE_FLEET_RELEASE``, ``EDGE_FLEET_COMMIT``; see
:func:`edge_agent.runner.release_environment`) plus the resource's ``env:``. A non-zero exit or a
timeout raises :class:`ApplyError` with the exit code and the last line of its error output (capped).

Commands cannot be undone: :meth:`CommandDriver.snapshot` returns ``[]`` and a rollback does not
reverse what a command did. Pruning a command does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, spec_digest
from edge_agent.errors import ApplyError
from edge_core.resources import CommandRes, Resource

if TYPE_CHECKING:
    from edge_agent.runner import RunResult
    from edge_agent.state import Managed

__all__ = ["CommandDriver", "CommandObserved", "run_command"]

Cmd = tuple[str, ...] | str


@dataclass(frozen=True)
class CommandObserved:
    """Why the command is skipped (``None``: it should run)."""

    skip: str | None = None


def _show(cmd: Cmd) -> str:
    text = cmd if isinstance(cmd, str) else " ".join(cmd)
    return text if len(text) <= 80 else text[:77] + "..."


def run_command(cmd: Cmd | list[str], timeout: float, ctx: Context,
                env: Iterable[tuple[str, str]] = ()) -> RunResult:
    """Run ``cmd`` of the release in the device root with the clean environment plus ``env``.

    Raises:
        ApplyError: the command cannot be started.
    """
    return ctx.runner.run_release_command(cmd if isinstance(cmd, str) else list(cmd), timeout=timeout,
                                          root=ctx.fs.root, who=ctx.command_env, env=env)


class CommandDriver(Driver):
    """Guarded commands."""

    kind: ClassVar[str] = "command"

    def _observe(self, res: Resource, ctx: Context) -> CommandObserved:
        """Evaluate the guards.

        Raises:
            PathError: the ``creates`` path is malformed.
            ApplyError: a guard cannot be started.
        """
        assert isinstance(res, CommandRes)
        if res.creates is not None and ctx.fs.guard_exists(res.creates):
            return CommandObserved(f"{res.creates} exists")
        if res.unless is not None and run_command(res.unless, res.timeout, ctx, res.env).ok:
            return CommandObserved(f"unless guard passed: {_show(res.unless)}")
        if res.onlyif is not None and not run_command(res.onlyif, res.timeout, ctx, res.env).ok:
            return CommandObserved(f"onlyif guard failed: {_show(res.onlyif)}")
        return CommandObserved(None)

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan one ``run`` unless a guard said to skip (pure)."""
        assert isinstance(res, CommandRes)
        assert isinstance(observed, CommandObserved)
        if observed.skip is not None:
            return []
        run: str | list[str] = res.run if isinstance(res.run, str) else list(res.run)
        return [Change(res.id, self.kind, "run", f"run {res.name}: {_show(res.run)}",
                       data={"name": res.name, "run": run, "timeout": res.timeout,
                             "refresh_only": res.refresh_only, "env": dict(res.env)})]

    def _apply(self, change: Change, ctx: Context) -> None:
        """Run the command.

        Raises:
            ApplyError: non-zero exit (with the code and the last line of stderr) or timeout.
        """
        if change.action != "run":
            raise self.unsupported(change)
        data = change.data
        run = data["run"]
        cmd: str | list[str] = run if isinstance(run, str) else [str(a) for a in run]
        timeout = float(data["timeout"])
        env = data.get("env") or {}
        result = run_command(cmd, timeout, ctx, [(str(k), str(v)) for k, v in env.items()])
        if result.timed_out:
            raise ApplyError(f"command {data['name']} timed out after {timeout:g}s")
        if result.returncode != 0:
            line = result.last_error_line()
            raise ApplyError(f"command {data['name']} exited with code {result.returncode}"
                             f"{': ' + line if line else ''}")

    def _snapshot(self, change: Change, ctx: Context) -> list[dict[str, Any]]:
        """Return ``[]``: a command cannot be undone."""
        return []

    def prune(self, managed: Managed, ctx: Context) -> list[Change]:
        """Return ``[]``: there is nothing to remove for a command."""
        return []

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return the command and its guards."""
        assert isinstance(res, CommandRes)

        def j(v: Cmd | None) -> str | list[str] | None:
            return list(v) if isinstance(v, tuple) else v

        spec: dict[str, Any] = {
            "kind": self.kind, "name": res.name, "run": j(res.run), "creates": res.creates,
            "unless": j(res.unless), "onlyif": j(res.onlyif), "timeout": res.timeout,
            "refresh_only": res.refresh_only, "watch": list(res.watch)}
        if res.env:  # absent when empty, so the specs recorded before ``env`` existed stay the same
            spec["env"] = dict(res.env)
        return spec, spec_digest(spec)
