"""Stand-in ``systemctl`` and ``sysctl`` executables for tests, plus a driver context builder.

:meth:`FakeSystem.install` writes two small Python programs into ``<tmp>/bin`` and prepends that
directory to PATH. They keep their state in one JSON file (units: enabled/active words; sysctl
values), append every call's argv as one JSON line to a log file, and answer like the real tools
for the sub-commands the drivers use:

* ``systemctl is-enabled|is-active|enable|disable|start|stop|restart|try-restart|daemon-reload``;
  a unit is known when the state has it or a file of that name is in one of the unit directories;
  :meth:`FakeSystem.fail_start` makes ``start``/``restart`` of a unit fail (exit 1, unit ``failed``).
* ``sysctl -n NAME`` and ``sysctl -w NAME=VALUE``; both tools take ``--`` before their operands as
  the real ones do (everything after it is an operand, even with a leading ``-``); unknown names
  fail with exit 255 like the real tool, and :meth:`FakeSystem.set_readonly` makes writes to a
  name fail with "permission denied".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.drivers.base import Context
from edge_agent.fsafe import FsRoot
from edge_agent.runner import Runner
from edge_core.resources import SecretFile
from tools.standins import write_standins

__all__ = ["FakeSystem", "make_context", "tree_state"]

@dataclass
class FakeSystem:
    """Handle on the stand-in tools: their bin directory, state file and call log."""

    bin_dir: Path
    state_path: Path
    log_path: Path

    @classmethod
    def install(cls, base: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
        """Write the stand-ins under ``base`` and put their directory first on PATH."""
        bin_dir = base / "fake-bin"
        bin_dir.mkdir(parents=True)
        fake = cls(bin_dir, base / "fake-system.json", base / "fake-calls.jsonl")
        fake.state_path.write_text(json.dumps({"units": {}, "sysctl": {}, "unit_dirs": []}))
        fake.log_path.write_text("")
        write_standins(bin_dir, fake.state_path, fake.log_path)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        return fake

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Return the whole state document."""
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data

    def _update(self, fn: Callable[[dict[str, Any]], None]) -> None:
        st = self.state()
        fn(st)
        self.state_path.write_text(json.dumps(st))

    def set_unit(self, name: str, *, enabled: str = "disabled", active: str = "inactive") -> None:
        """Make ``name`` a known unit with the given ``is-enabled`` and ``is-active`` words."""
        self._update(lambda st: st["units"].__setitem__(name, {"enabled": enabled, "active": active}))

    def unit(self, name: str) -> dict[str, str] | None:
        """Return ``{"enabled", "active"}`` of a unit, ``None`` when never seen."""
        unit: dict[str, str] | None = self.state()["units"].get(name)
        return unit

    def add_unit_dir(self, host_dir: Path) -> None:
        """Make units whose file is in ``host_dir`` known to the stand-in systemctl."""
        self._update(lambda st: st["unit_dirs"].append(str(host_dir)))

    def fail_start(self, name: str) -> None:
        """Make ``start``/``restart`` of ``name`` fail (exit 1) and leave it ``failed``."""
        self._update(lambda st: st.setdefault("fail_start", []).append(name))

    def reloads(self) -> int:
        """Return how many ``daemon-reload`` calls were made."""
        return int(self.state().get("reloads", 0))

    def set_sysctl(self, name: str, value: str) -> None:
        """Make ``name`` an existing kernel parameter holding ``value``."""
        self._update(lambda st: st["sysctl"].__setitem__(name, value))

    def set_readonly(self, name: str) -> None:
        """Make writes of ``name`` fail with permission denied."""
        self._update(lambda st: st.setdefault("readonly", []).append(name))

    def sysctl(self, name: str) -> str | None:
        """Return the current value of kernel parameter ``name``."""
        value: str | None = self.state()["sysctl"].get(name)
        return value

    # -- calls ----------------------------------------------------------------------------------

    def calls(self, tool: str | None = None) -> list[list[str]]:
        """Return every recorded argv (optionally only those of ``tool``), oldest first."""
        out = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        return [c for c in out if tool is None or c[0] == tool]

    def clear_calls(self) -> None:
        """Forget the recorded calls."""
        self.log_path.write_text("")


def make_context(
    root: Path, payloads: Mapping[str, bytes] | None = None, *, allowed_roots: tuple[str, ...] = ("/",),
    open_secret: Callable[[SecretFile, bytes], bytes] | None = None, digest_key: bytes = b"k" * 32,
) -> Context:
    """Return a driver context on the device root ``root`` (a tmp dir) with a real runner.

    ``secret_digest`` is HMAC-SHA256 with ``digest_key``; ``open_secret`` defaults to one that
    refuses (tests of secrets pass a real PyNaCl opener).
    """

    def refuse(res: SecretFile, sealed: bytes) -> bytes:
        raise AssertionError(f"no secret opener wired for {res.id}")

    def digest(data: bytes) -> str:
        return hmac.new(digest_key, data, hashlib.sha256).hexdigest()

    store = root.parent / f"{root.name}-backups"
    return Context(fs=FsRoot(root, allowed_roots), runner=Runner(), payloads=dict(payloads or {}),
                   open_secret=open_secret or refuse, backup_store=store, secret_digest=digest)


def tree_state(root: Path) -> dict[str, tuple[str, int, str]]:
    """Return path -> (kind, mode, content digest or link target) of everything below ``root``."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = "/" + str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("symlink", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
