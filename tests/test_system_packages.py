"""``tools/ensure-system-packages.sh``: what ``make`` installs on a fresh Debian, and how.

The script runs for real under bash; only the OS edge is stood in for: ``id``, ``dpkg-query``,
``apt-get``, ``sudo`` and ``systemctl`` are small executables first on PATH that record their argv
(``sudo`` then runs the rest of its command line, as the real one does). Installing into the real
machine, and the README's two commands on a fresh Debian root, are ``make test-fresh``
(``packaging/test-fresh.sh``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "ensure-system-packages.sh"

ALL = ["python3", "python3-venv", "ca-certificates", "mosquitto", "mosquitto-clients", "git",
       "openssh-client", "openssh-server", "openssl", "chromium", "libatomic1", "debootstrap", "postgresql",
       "prometheus"]

STANDIN = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$STANDIN_LOG"
"""


@dataclass
class Machine:
    """Stand-in OS tools in ``bin_dir``; every call is one line in ``log``."""

    bin_dir: Path
    log: Path

    def calls(self, tool: str | None = None) -> list[str]:
        """Return the recorded calls (``"tool arg …"``), of one tool when given."""
        lines = self.log.read_text().splitlines()
        return [line for line in lines if tool is None or line.split(" ", 1)[0] == tool]

    def run(self, *args: str, uid: int = 0, installed: list[str], sudo_ok: bool = True,
            apt_fails: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the script as user ``uid`` on a machine where ``installed`` are the packages."""
        env = {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
               "STANDIN_LOG": str(self.log), "FAKE_UID": str(uid), "FAKE_INSTALLED": " ".join(installed),
               "FAKE_SUDO_OK": "1" if sudo_ok else "0", "FAKE_APT_FAILS": "1" if apt_fails else "0"}
        return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                              timeout=30, check=False)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "id": 'echo "$FAKE_UID"',
        # like dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n': installed ones only, exit 1 if any is not
        "dpkg-query": ('shift 2; rc=0; for p in "$@"; do case " $FAKE_INSTALLED " in *" $p "*) '
                       'echo "$p ii ";; *) echo "dpkg-query: no packages found matching $p" >&2; rc=1;; '
                       'esac; done; exit $rc'),
        "apt-get": ('[ "$FAKE_APT_FAILS" = 1 ] && { echo "E: Unable to locate package" >&2; exit 100; }; '
                    'exit 0'),
        "sudo": ('[ "$1" = -n ] || exit 1; shift; [ "$FAKE_SUDO_OK" = 1 ] || '
                 '{ echo "sudo: a password is required" >&2; exit 1; }; exec "$@"'),
        "systemctl": "exit 0",  # "active": the script must not even ask
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(STANDIN + body + "\n")
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    return Machine(bin_dir, log)


def test_nothing_missing_touches_neither_apt_nor_any_service(machine: Machine) -> None:
    proc = machine.run(installed=ALL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert machine.calls("apt-get") == []
    assert machine.calls("sudo") == []
    assert machine.calls("systemctl") == [], "a running system service was queried or stopped"


def test_root_installs_exactly_the_missing_packages_with_apt_get(machine: Machine) -> None:
    proc = machine.run(uid=0, installed=[p for p in ALL if p not in ("postgresql", "prometheus")])
    assert proc.returncode == 0, proc.stderr
    apt = machine.calls("apt-get")
    assert len(apt) == 2
    assert apt[0].endswith(" update -qq")
    assert apt[1].split(" install ", 1)[1].split() == ["-y", "-qq", "--no-install-recommends",
                                                        "postgresql", "prometheus"]
    assert machine.calls("sudo") == []
    assert machine.calls("systemctl") == []


def test_the_venv_set_comes_first_and_is_only_python(machine: Machine) -> None:
    proc = machine.run("venv", uid=0, installed=["python3"])
    assert proc.returncode == 0, proc.stderr
    install = machine.calls("apt-get")[-1]
    assert install.split("--no-install-recommends ", 1)[1].split() == ["python3-venv", "ca-certificates"]


def test_a_user_with_passwordless_sudo_installs_through_sudo_n(machine: Machine) -> None:
    proc = machine.run(uid=1000, installed=[p for p in ALL if p != "python3-venv"])
    assert proc.returncode == 0, proc.stderr
    sudo = machine.calls("sudo")
    assert sudo[0] == "sudo -n true"
    assert [c.split(" ", 3)[:3] for c in sudo[1:]] == [["sudo", "-n", "env"]] * 2
    assert sudo[-1].endswith("--no-install-recommends python3-venv")
    assert len(machine.calls("apt-get")) == 2  # both went through sudo, none as the user


def test_a_user_without_sudo_gets_one_line_naming_the_missing_packages(machine: Machine) -> None:
    proc = machine.run(uid=1000, installed=["python3", "git"], sudo_ok=False)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ensure-system-packages: missing Debian packages: python3-venv ")
    assert "passwordless sudo" in lines[0]
    assert "sudo apt-get install python3-venv" in lines[0]
    assert "Traceback" not in proc.stderr
    assert machine.calls("apt-get") == []


def test_a_failing_apt_get_is_a_one_line_reason_and_exit_1(machine: Machine) -> None:
    proc = machine.run("venv", uid=0, installed=["python3", "ca-certificates"], apt_fails=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "ensure-system-packages: apt-get update failed (see above)"


def test_an_unknown_package_set_is_refused(machine: Machine) -> None:
    proc = machine.run("everything", installed=ALL)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ensure-system-packages: unknown package set 'everything' "
                                   "(expected venv or all)")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_python3_venv_before_it_creates_the_venv() -> None:
    """`make -n -B` lists the stamp's commands in order without running them."""
    proc = subprocess.run(["make", "-n", "-B", ".venv/.installed-stamp"], cwd=REPO, capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    first_venv = next(i for i, line in enumerate(lines) if " -m venv" in line)
    sysdeps = next(i for i, line in enumerate(lines) if "ensure-system-packages.sh venv" in line)
    assert sysdeps < first_venv, proc.stdout


def _venv_checkout(tmp_path: Path, *, pip_works: bool) -> tuple[Path, Path]:
    """A checkout with a stand-in ensure script, a stand-in python3 (``PY``) that makes a venv whose
    python records its argv, and a .venv whose python has pip or, as after a ``python3 -m venv`` that
    failed for want of python3-venv, has not."""
    work = tmp_path / "checkout"
    (work / "tools").mkdir(parents=True)
    (work / "pyproject.toml").write_text("")
    log = tmp_path / "calls.log"
    log.write_text("")
    sysdeps = work / "tools" / "ensure-system-packages.sh"
    sysdeps.write_text(f'printf "%s\\n" "ensure $*" >> {log}\n')

    def venv_python(pip_status: int) -> str:
        return ("#!/bin/sh\n"
                f'printf "%s\\n" "venv-python $*" >> {log}\n'
                f'[ "$*" = "-m pip --version" ] && exit {pip_status}\nexit 0\n')

    fake_py = tmp_path / "python3"
    fake_py.write_text("#!/bin/sh\n"
                       f'printf "%s\\n" "python3 $*" >> {log}\n'
                       f"mkdir -p .venv/bin && cat > .venv/bin/python <<'PY'\n{venv_python(0)}PY\n"
                       "chmod +x .venv/bin/python\n")
    fake_py.chmod(0o755)
    (work / ".venv" / "bin").mkdir(parents=True)
    old = work / ".venv" / "bin" / "python"
    old.write_text(venv_python(0 if pip_works else 1))
    old.chmod(0o755)
    return work, log


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("pip_works", [False, True])
def test_make_remakes_a_venv_left_without_pip(tmp_path: Path, pip_works: bool) -> None:
    work, log = _venv_checkout(tmp_path, pip_works=pip_works)
    proc = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), f"PY={tmp_path / 'python3'}",
                           ".venv/.installed-stamp"], cwd=work, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "ensure venv"
    made = [c for c in calls if c.startswith("python3 ")]
    assert made == ([] if pip_works else ["python3 -m venv --clear .venv"])
    assert calls[-1].startswith("venv-python -m pip install -q -e")
    assert (work / ".venv" / ".installed-stamp").exists()
