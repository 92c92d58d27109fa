"""Stand-in ``systemctl`` and ``sysctl`` executables for tests, plus a driver context builder.

:meth:`FakeSystem.install` writes two small Python programs into ``<tmp>/bin`` and prepends that
directory to PATH. They keep their state in one JSON file (units: enabled/active words; sysctl
values), append every call's argv as one JSON line to a log file, and answer like the real tools
for the sub-commands the drivers use:

* ``systemctl is-enabled|is-active|enable|disable|start|stop|restart|try-restart|daemon-reload``;
  a unit is known when the state has it or a file of that name is in one of the unit directories;
  :meth:`FakeSystem.fail_start` makes ``start``/``restart`` of a unit fail (exit 1, unit ``failed``).
* ``sysctl -n NAME`` and ``sysctl -w NAME=VALUE``; unknown names fail with exit 255 like the real
  tool, and :meth:`FakeSystem.set_readonly` makes writes to a name fail with "permission denied".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.drivers.base import Context
from edge_agent.fsafe import FsRoot
from edge_agent.resources import SecretFile
from edge_agent.runner import Runner

__all__ = ["FakeSystem", "make_context", "tree_state"]

_SYSTEMCTL = r'''
import json, os, sys
STATE, LOG = {state!r}, {log!r}
argv = sys.argv[1:]
with open(LOG, "a") as f:
    f.write(json.dumps(["systemctl", *argv]) + "\n")
with open(STATE) as f:
    st = json.load(f)
units = st.setdefault("units", {{}})
args = [a for a in argv if not a.startswith("-")]
verb, names = (args[0], args[1:]) if args else ("", [])

def known(name):
    return name in units or any(os.path.exists(os.path.join(d, name)) for d in st.get("unit_dirs", []))

def unit(name):
    return units.setdefault(name, {{"enabled": "disabled", "active": "inactive"}})

def save():
    tmp = STATE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, STATE)

rc = 0
if verb == "daemon-reload":
    st["reloads"] = st.get("reloads", 0) + 1
elif verb == "is-enabled":
    name = names[0]
    if not known(name):
        print(f"Failed to get unit file state for {{name}}: No such file or directory", file=sys.stderr)
        rc = 1
    else:
        word = unit(name)["enabled"]
        print(word)
        rc = 0 if word in ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated") else 1
elif verb == "is-active":
    word = unit(names[0])["active"] if names[0] in units else "inactive"
    print(word)
    rc = 0 if word == "active" else 3
elif verb in ("enable", "disable"):
    name = names[0]
    if not known(name):
        print(f"Failed to {{verb}} unit: Unit file {{name}} does not exist.", file=sys.stderr)
        rc = 1
    elif unit(name)["enabled"] in ("static", "masked") and verb == "enable":
        print(f"Failed to enable unit: Unit file {{name}} is {{unit(name)['enabled']}}.", file=sys.stderr)
        rc = 1
    else:
        unit(name)["enabled"] = "enabled" if verb == "enable" else "disabled"
elif verb in ("start", "restart", "try-restart", "stop"):
    name = names[0]
    if verb == "try-restart" and (name not in units or units[name]["active"] != "active"):
        pass
    elif not known(name):
        print(f"Failed to {{verb}} {{name}}: Unit {{name}} not found.", file=sys.stderr)
        rc = 5
    elif verb == "stop":
        unit(name)["active"] = "inactive"
    elif name in st.get("fail_start", []):
        unit(name)["active"] = "failed"
        print(f"Job for {{name}} failed because the control process exited with error code.",
              file=sys.stderr)
        rc = 1
    else:
        unit(name)["active"] = "active"
        st.setdefault("starts", {{}})[name] = st.get("starts", {{}}).get(name, 0) + 1
else:
    print(f"Unknown command verb {{verb}}.", file=sys.stderr)
    rc = 1
save()
sys.exit(rc)
'''

_SYSCTL = r'''
import json, os, sys
STATE, LOG = {state!r}, {log!r}
argv = sys.argv[1:]
with open(LOG, "a") as f:
    f.write(json.dumps(["sysctl", *argv]) + "\n")
with open(STATE) as f:
    st = json.load(f)
values = st.setdefault("sysctl", {{}})

def missing(name):
    path = "/proc/sys/" + name.replace(".", "/")
    print(f"sysctl: cannot stat {{path}}: No such file or directory", file=sys.stderr)
    sys.exit(255)

if argv[:1] == ["-n"] and len(argv) == 2:
    if argv[1] not in values:
        missing(argv[1])
    print(values[argv[1]])
elif argv[:1] == ["-w"] and len(argv) == 2 and "=" in argv[1]:
    name, value = argv[1].split("=", 1)
    if name not in values:
        missing(name)
    if name in st.get("readonly", []):
        print(f"sysctl: permission denied on key '{{name}}'", file=sys.stderr)
        sys.exit(255)
    values[name] = value
    tmp = STATE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, STATE)
    print(f"{{name}} = {{value}}")
else:
    print("sysctl: usage: sysctl -n NAME | sysctl -w NAME=VALUE", file=sys.stderr)
    sys.exit(1)
'''


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
        for name, body in (("systemctl", _SYSTEMCTL), ("sysctl", _SYSCTL)):
            script = bin_dir / name
            text = body.format(state=str(fake.state_path), log=str(fake.log_path))
            script.write_text(f"#!{sys.executable} -I\n{text}")
            script.chmod(0o755)
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
