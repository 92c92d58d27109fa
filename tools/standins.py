"""Stand-in ``systemctl`` and ``sysctl`` executables for places where the real ones cannot run.

Simulated devices (the tests, the demo, the benchmarks) live in a directory, not a machine, so the
host's systemd and kernel must not be touched. :func:`write_standins` writes two small Python
programs that keep their state in one JSON file (units: enabled/active words; sysctl values),
append every call's argv as one JSON line to a log file, and answer like the real tools for the
sub-commands the drivers use. Everything else in the agent runs for real.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["write_standins"]

_SYSTEMCTL = r'''
import json, os, sys
STATE, LOG = {state!r}, {log!r}
argv = sys.argv[1:]
with open(LOG, "a") as f:
    f.write(json.dumps(["systemctl", *argv]) + "\n")
with open(STATE) as f:
    st = json.load(f)
units = st.setdefault("units", {{}})
# like getopt: "--" ends the options, everything after it is an operand even if it starts with "-"
head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
args = [a for a in head if not a.startswith("-")] + tail
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

# like getopt: "--" ends the options, everything after it is an operand even if it starts with "-"
head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
opts = [a for a in head if a.startswith("-")]
operands = [a for a in head if not a.startswith("-")] + tail
if opts == ["-n"] and len(operands) == 1:
    if operands[0] not in values:
        missing(operands[0])
    print(values[operands[0]])
elif opts == ["-w"] and len(operands) == 1 and "=" in operands[0]:
    name, value = operands[0].split("=", 1)
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


def write_standins(bin_dir: Path, state_path: Path, log_path: Path) -> None:
    """Write ``systemctl`` and ``sysctl`` stand-ins into ``bin_dir`` (state and call log files)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if not state_path.exists():
        state_path.write_text(json.dumps({"units": {}, "sysctl": {}, "unit_dirs": []}))
    if not log_path.exists():
        log_path.write_text("")
    for name, body in (("systemctl", _SYSTEMCTL), ("sysctl", _SYSCTL)):
        script = bin_dir / name
        text = body.format(state=str(state_path), log=str(log_path))
        # -I: no environment or user site; -S: no site-packages either (the stand-ins need the
        # standard library alone, and every call they save start-up on is one a driver waits for)
        script.write_text(f"#!{sys.executable} -IS\n{text}")
        script.chmod(0o755)
