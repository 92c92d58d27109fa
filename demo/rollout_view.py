"""Following a rollout through the fleet server's API, with one progress bar per wave.

On a terminal the bars redraw in place (like ``fleetctl rollout watch``); otherwise (a pipe, a test)
a wave's line is printed once, when its gates are decided, so the output stays short. A wave that
waits for approval (``pause_before: true`` on the next wave) is promoted with ``fleetctl rollout
promote``, as an operator would after looking at it.
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from demo.parts import FleetServer
from demo.procs import BIN, DemoError, run_tool, say
from fleet_server.cli.devices import api_get
from fleet_server.cli.rollout import progress_bar
from fleet_server.errors import ApiError

__all__ = ["FINAL_PHASES", "find_rollout", "follow_rollout", "wave_line", "wave_progress"]

FINAL_PHASES = ("succeeded", "halted", "rolled_back", "aborted", "superseded")
_REFRESH_S = 0.3


def wave_progress(rollout: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    """Return the counts to show for wave ``index``: its current progress, or for a failed wave the
    counts its failing gate decision saw (a rollback reassigns the wave's devices right after)."""
    wave = (rollout.get("waves") or [])[index]
    if wave.get("result") == "failed":
        for gate in rollout.get("gates") or []:
            detail = gate.get("detail") or {}
            if gate.get("wave") == index and not gate.get("passed") and "reported" in detail:
                failed, reported = int(detail.get("failures") or 0), int(detail.get("reported") or 0)
                members = int(wave.get("devices") or reported)
                return {"done": reported - failed, "failed": failed, "pending": max(0, members - reported)}
    return dict(wave.get("progress") or {})


def wave_line(index: int, wave: Mapping[str, Any], progress: Mapping[str, Any] | None = None) -> str:
    """Return one wave as ``wave 1 canary   [####......] done 2  failed 0  pending 0  passed``
    (``progress`` overrides the wave's own counts)."""
    p = progress if progress is not None else (wave.get("progress") or {})
    counts = f"done {p.get('done', 0):>2}  failed {p.get('failed', 0)}  pending {p.get('pending', 0):>2}"
    if p.get("offline"):
        counts += f"  offline {p['offline']}"
    result = f"  {wave['result']}" if wave.get("result") else ""
    return f"wave {index + 1} {wave.get('name', '')!s:<9} {progress_bar(p, 16)} {counts}{result}"


def _get(server: FleetServer, path: str, query: list[tuple[str, str]] | None = None) -> Any:
    try:
        return api_get(server.url, path, query or [], timeout=10)
    except ApiError as exc:
        raise DemoError(str(exc)) from exc


def find_rollout(server: FleetServer, release: int, timeout: float = 30.0) -> str:
    """Wait until the server has a rollout of ``release`` (the Git watcher starts it); return its id.

    Raises:
        DemoError: none appeared in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = _get(server, "/api/v1/rollouts", [("limit", "10")])
        for r in listing.get("rollouts") or []:
            if r.get("release") == release:
                return str(r["id"])
        time.sleep(0.2)
    raise DemoError(f"no rollout of release {release} started within {timeout:g} s")


def _promote(server: FleetServer, rollout_id: str, wave: int) -> None:
    run_tool([BIN / "fleetctl", "rollout", "promote", rollout_id, "--wave", str(wave + 1),
              "--reason", "earlier waves look healthy", "--server", server.url,
              "--token-file", server.token_file, "--actor", "demo-operator"])


def follow_rollout(server: FleetServer, rollout_id: str, *, timeout: float = 120.0,
                   indent: str = "   ") -> dict[str, Any]:
    """Show the rollout's waves until it reaches a final phase; promote waves waiting for approval.
    Return the final rollout document.

    Raises:
        DemoError: it did not end within ``timeout`` seconds, or the server cannot be reached.
    """
    path = f"/api/v1/rollouts/{urllib.parse.quote(rollout_id, safe='')}"
    tty = sys.stdout.isatty()
    drawn = 0
    printed: set[int] = set()
    promoted: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        r = _get(server, path)
        waves = r.get("waves") or []
        phase = str(r.get("phase"))
        if tty:
            width = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line would spoil the redraw
            text = "".join(f"{indent}{wave_line(i, w, wave_progress(r, i))}"[:width] + "\n"
                           for i, w in enumerate(waves))
            text += f"{indent}phase {phase}\n"
            sys.stdout.write((f"\x1b[{drawn}F\x1b[J" if drawn else "") + text)
            sys.stdout.flush()
            drawn = text.count("\n")
        else:
            for i, w in enumerate(waves):
                if i not in printed and (w.get("result") or phase in FINAL_PHASES):
                    say(indent + wave_line(i, w, wave_progress(r, i)))
                    printed.add(i)
        if phase in FINAL_PHASES:
            if not tty:
                say(f"{indent}phase {phase}")
            return dict(r)
        wave = int(r.get("wave") or 0)
        if phase == "waiting_approval" and wave not in promoted:
            promoted.add(wave)
            _promote(server, rollout_id, wave)
            gated = wave if wave < len(waves) and not waves[wave].get("started") else wave + 1
            name = waves[gated].get("name", "") if gated < len(waves) else ""
            note = (f"{indent}wave {gated + 1} ({name}) needs approval before it starts: "
                    f"fleetctl rollout promote {rollout_id} --wave {wave + 1}")
            if tty:
                sys.stdout.write(f"\x1b[{drawn}F\x1b[J{note}\n")
                drawn = 0
            else:
                say(note)
        if time.monotonic() > deadline:
            raise DemoError(f"rollout {rollout_id} still {phase} after {timeout:g} s")
        time.sleep(_REFRESH_S)
