"""The .deb packages: built for real with packaging/build_deb.py, inspected with dpkg-deb.

Checks the control metadata, the file list, the conffiles, the maintainer scripts (mode and
``sh -n``), the systemd units (``systemd-analyze verify`` when present, else a parser check), the
relocated virtual environment (it runs from the extracted tree and names no build path) and that
the shipped default configurations match the configuration schemas. Installing into a Debian root
is tests/packaging/test_install_chroot.py.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from nacl.signing import SigningKey

from edge_agent.config import DEFAULT_CONFIG_PATH, DEFAULT_PROFILE_DIRS, load_config
from edge_core.errors import ConfigError
from edge_core.trust.keys import format_verify_key
from fleet_server.config import DEFAULT_CONFIG_PATH as SERVER_CONFIG_PATH
from fleet_server.config import load_server_config
from tests.support.debs import built_debs
from tests.support.package_spec import agent_dropped_extensions, load_builder

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no Debian /usr/bin/python3"),
]


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=600,
                          check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}{proc.stdout}"
    return proc.stdout


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return built_debs(tmp_path_factory)


@pytest.fixture(scope="module")
def extracted(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {}
    for name, deb in debs.items():
        root = tmp_path_factory.mktemp(f"x-{name}")
        run("dpkg-deb", "-x", deb, root)
        run("dpkg-deb", "-e", deb, root / "DEBIAN")
        roots[name] = root
    return roots


def control(deb: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in run("dpkg-deb", "-f", deb).splitlines():
        if line and not line.startswith(" "):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def listing(deb: Path) -> dict[str, tuple[str, str, str]]:
    """path -> (mode string, owner/group, link target or '')."""
    out: dict[str, tuple[str, str, str]] = {}
    for line in run("dpkg-deb", "-c", deb).splitlines():
        parts = line.split(None, 5)
        name = parts[5]
        target = ""
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        out[name.removeprefix(".").rstrip("/") or "/"] = (parts[0], parts[1], target)
    return out


def test_debian_version_maps_pep440_so_it_sorts_the_same() -> None:
    builder = load_builder()
    assert builder.debian_version("0.1.0") == "0.1.0"
    assert builder.debian_version("1.2rc1") == "1.2~rc1"
    assert builder.debian_version("1.2.0.dev3") == "1.2.0~dev3"
    assert builder.debian_version("2.0b2") == "2.0~b2"
    ordered = ["1.0~dev1", "1.0~rc1", "1.0", "1.0.1"]
    for lower, higher in itertools.pairwise(ordered):
        compare = subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher], check=False)
        assert compare.returncode == 0
    with pytest.raises(builder.BuildError):
        builder.debian_version("1.0 beta")


def requirement_names(path: Path) -> set[str]:
    names = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[=<>!~ \[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_pinned_requirements_cover_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    agent = requirement_names(PACKAGING / "requirements-agent.txt")
    server = requirement_names(PACKAGING / "requirements-server.txt")
    def name(spec: str) -> str:
        return re.split(r"[=<>!~ \[]", spec, maxsplit=1)[0].lower().replace("_", "-")

    runtime = {name(d) for d in project["dependencies"]}
    extra = {name(d) for group in ("server", "postgres") for d in project["optional-dependencies"][group]}
    assert runtime <= agent
    assert runtime | extra <= server
    assert not {"fastapi", "uvicorn", "prometheus-client"} & agent
    for path in (PACKAGING / "requirements-agent.txt", PACKAGING / "requirements-server.txt"):
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            assert not line or "==" in line, f"{path.name}: not pinned: {line}"


def test_control_metadata(debs: dict[str, Path]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    arch = run("dpkg", "--print-architecture").strip()
    for name, deb in debs.items():
        assert deb.name == f"{name}_{load_builder().debian_version(version)}_{arch}.deb"
        fields = control(deb)
        assert fields["Package"] == name
        assert fields["Architecture"] == arch
        assert fields["Version"] == load_builder().debian_version(version)
        depends = [d.strip() for d in fields["Depends"].split(",")]
        assert "python3.11" in depends
        assert "python3 (>= 3.11)" in depends
        assert any(d.startswith("libc6 (>= 2.") for d in depends)
        # the Python libraries travel in the venv, never as Debian's python3-* packages
        assert not any(d.startswith("python3-") for d in depends)
        assert "git" not in depends
        assert int(fields["Installed-Size"]) > 1000
        assert fields["Description"]
    assert "adduser" in control(debs["fleet-server"])["Depends"]


def test_agent_file_list(debs: dict[str, Path]) -> None:
    files = listing(debs["edge-agent"])
    assert all(owner == "root/root" for _m, owner, _t in files.values())
    assert files["/usr/bin/edge-agent"][0].startswith("l")
    assert files["/usr/bin/edge-agent"][2] == "/opt/edge-agent/bin/edge-agent"
    assert files["/opt/edge-agent/bin/edge-agent"][0] == "-rwxr-xr-x"
    assert files["/opt/edge-agent/bin/python3.11"][2] == "/usr/bin/python3.11"
    assert files["/etc/edge-agent/agent.yaml"][0] == "-rw-r--r--"
    assert files["/lib/systemd/system/edge-agent.service"][0] == "-rw-r--r--"
    for profile in sorted((REPO / "device_profiles").glob("*.yaml")):
        assert f"/usr/share/edge-agent/profiles/{profile.name}" in files
    site = "/opt/edge-agent/lib/python3.11/site-packages"
    for module in ("edge_agent/cli.py", "edge_agent/__pycache__/cli.cpython-311.opt-2.pyc",
                   "paho/mqtt/client.py", "dulwich/client.py", "yaml/__init__.py", "nacl/signing.py",
                   "edge_agent/bytecode.py"):
        assert f"{site}/{module}" in files, module
    # its commands run with -OO, so its byte code is of that level only
    pycs = [p for p in files if p.endswith(".pyc")]
    assert len(pycs) > 200
    assert [p for p in pycs if not p.endswith(".opt-2.pyc")] == []
    # only the agent's runtime: no server packages (sqlite-utils and its closure, pip among it), no
    # fleet_server, no fleetctl, no psutil (the agent reads /proc itself)
    for absent in ("fastapi", "uvicorn", "prometheus_client", "fleet_server", "starlette", "sqlite_utils",
                   "pip", "click", "tabulate", "dateutil", "tzdata", "psutil"):
        assert f"{site}/{absent}" not in files, absent
    # nor the compiled accelerators it leaves out: dulwich runs its own Python instead
    dropped = agent_dropped_extensions()
    assert "dulwich._pack" in dropped
    for module in dropped:
        stem = f"{site}/{module.replace('.', '/')}."
        assert not [p for p in files if p.startswith(stem) and p.endswith(".so")], module
    # bin/ holds the interpreter links and edge-agent: no activate scripts, no dependency's tools
    bin_dir = "/opt/edge-agent/bin/"
    in_bin = {p.removeprefix(bin_dir) for p in files if p.startswith(bin_dir)}
    assert in_bin == {"edge-agent", "python", "python3", "python3.11"}, in_bin
    assert "/opt/edge-agent/bin/fleetctl" not in files
    assert "/usr/bin/fleetctl" not in files
    # state is created by postinst with its own mode, never shipped
    assert not any(p.startswith("/var/lib") for p in files)


def test_server_file_list(debs: dict[str, Path]) -> None:
    files = listing(debs["fleet-server"])
    assert files["/usr/bin/fleet-server"][2] == "/opt/fleet-server/bin/fleet-server"
    assert files["/usr/bin/fleetctl"][2] == "/opt/fleet-server/bin/fleetctl"
    assert "/lib/systemd/system/fleet-server.service" in files
    assert f"/etc/fleet-server/{SERVER_CONFIG_PATH.name}" in files
    site = "/opt/fleet-server/lib/python3.11/site-packages"
    for module in ("fleet_server/fleetctl.py", "edge_core/trust/keys.py", "fastapi/__init__.py",
                   "uvicorn/__init__.py", "prometheus_client/__init__.py", "sqlite_utils/db.py"):
        assert f"{site}/{module}" in files, module
    assert f"{site}/fleet_server/__pycache__/fleetctl.cpython-311.pyc" in files
    assert not any(p.endswith(".opt-2.pyc") for p in files)


def test_conffiles(extracted: dict[str, Path]) -> None:
    agent = (extracted["edge-agent"] / "DEBIAN" / "conffiles").read_text().split()
    assert agent == [str(DEFAULT_CONFIG_PATH)]
    server = (extracted["fleet-server"] / "DEBIAN" / "conffiles").read_text().split()
    assert server == [str(SERVER_CONFIG_PATH)]
    for name, files in (("edge-agent", agent), ("fleet-server", server)):
        for conf in files:
            assert (extracted[name] / conf.lstrip("/")).is_file()


def test_maintainer_scripts_are_executable_and_parse(extracted: dict[str, Path]) -> None:
    for root in extracted.values():
        for script in ("postinst", "prerm", "postrm"):
            path = root / "DEBIAN" / script
            assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
            assert path.read_text().startswith("#!/bin/sh\n")
            run("sh", "-n", path)
            text = path.read_text()
            assert "set -e" in text
            # never fail without a running systemd (a chroot, an image build): systemctl only runs
            # behind the /run/systemd/system check, and its failures are tolerated
            calls = [line.strip() for line in text.splitlines()
                     if "systemctl " in line and not line.lstrip().startswith(("#", "echo "))]
            for line in calls:
                assert line.endswith(("|| true", "; then")) or "|| echo" in line, line
            if calls:
                assert "if [ -d /run/systemd/system ]; then" in text
    postrm = (extracted["edge-agent"] / "DEBIAN" / "postrm").read_text()
    purge = postrm.split("purge)", 1)[1].split(";;", 1)[0]
    assert "rm -rf /var/lib/edge-agent /etc/edge-agent" in purge
    remove = postrm.split("remove)", 1)[1].split(";;", 1)[0]
    assert "rm " not in remove
    # the standard library's optimised byte code: written on configure and by the trigger on the
    # standard library's directory, deleted before removal; the server runs unoptimised
    agent_debian = extracted["edge-agent"] / "DEBIAN"
    assert (agent_debian / "triggers").read_text() == "interest-noawait /usr/lib/python3.11\n"
    postinst = (agent_debian / "postinst").read_text()
    for case in ("configure)", "triggered)"):
        assert "stdlib_bytecode" in postinst.split(case, 1)[1].split(";;", 1)[0], case
    assert "/opt/edge-agent/bin/python -OO -m edge_agent.bytecode ||" in postinst
    prerm = (agent_debian / "prerm").read_text()
    assert "-m edge_agent.bytecode --remove" in prerm.split("remove|deconfigure)", 1)[1].split(";;", 1)[0]
    assert not (extracted["fleet-server"] / "DEBIAN" / "triggers").exists()


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A minimal systemd unit parser: sections -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep == "=", f"{path}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_directives(extracted: dict[str, Path]) -> None:
    agent = unit_sections(extracted["edge-agent"] / "lib/systemd/system/edge-agent.service")
    server = unit_sections(extracted["fleet-server"] / "lib/systemd/system/fleet-server.service")
    for unit in (agent, server):
        assert set(unit) == {"Unit", "Service", "Install"}
        assert "network-online.target" in unit["Unit"]["After"][0].split()
        assert unit["Unit"]["Wants"] == ["network-online.target"]
        assert unit["Unit"]["StartLimitIntervalSec"]
        assert unit["Unit"]["StartLimitBurst"]
        svc = unit["Service"]
        assert svc["Restart"] == ["on-failure"]
        assert svc["RestartSec"] == ["5s"]
        assert svc["StandardOutput"] == ["journal"]
        assert svc["StandardError"] == ["journal"]
        assert svc["NoNewPrivileges"] == ["yes"]
        assert svc["PrivateTmp"] == ["yes"]
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    svc = agent["Service"]
    assert svc["ExecStart"] == [f"/usr/bin/edge-agent run --config {DEFAULT_CONFIG_PATH}"]
    # the agent manages system files and sysctls: nothing may make them read-only for it
    assert svc["ProtectKernelTunables"] == ["no"]
    for forbidden in ("ProtectSystem", "ProtectHome", "ReadOnlyPaths", "User", "DynamicUser",
                      "CapabilityBoundingSet", "PrivateDevices"):
        assert forbidden not in svc, forbidden
    ssvc = server["Service"]
    assert ssvc["User"] == ["fleet-server"]
    assert ssvc["ExecStart"] == [f"/usr/bin/fleet-server --config {SERVER_CONFIG_PATH}"]
    assert ssvc["ProtectSystem"] == ["strict"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(extracted: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    for tree in extracted.values():
        shutil.copytree(tree, root, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns("DEBIAN"))
    # the targets and units the packaged units refer to, from the host
    host_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                       if (p / "multi-user.target").exists()), None)
    if host_units is None:
        pytest.skip("the host has no systemd unit directory to verify against")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    units = [root / "lib/systemd/system/edge-agent.service", root / "lib/systemd/system/fleet-server.service"]
    proc = subprocess.run(["systemd-analyze", f"--root={root}", "verify", *map(str, units)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if "edge-agent" in line or "fleet-server" in line]
    assert problems == []


def test_venv_runs_from_the_tree_and_names_no_build_path(extracted: dict[str, Path], tmp_path: Path) -> None:
    agent = extracted["edge-agent"]
    script = agent / "opt/edge-agent/bin/edge-agent"
    assert script.read_text().splitlines()[0] == "#!/opt/edge-agent/bin/python -OO"
    server_script = extracted["fleet-server"] / "opt/fleet-server/bin/fleetctl"
    assert server_script.read_text().splitlines()[0] == "#!/opt/fleet-server/bin/python"
    cfg = (agent / "opt/edge-agent/pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    assert "include-system-site-packages = false" in cfg
    python = agent / "opt/edge-agent/bin/python"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = run(python, "-m", "edge_agent.cli", "--version", cwd=tmp_path)
    assert out.strip() == f"edge-agent {version}"
    out = run(python, "-c", "import sys, paho.mqtt, dulwich, yaml, nacl.signing; "
              "import importlib.util as u; print(sys.prefix, u.find_spec('fastapi') is None, "
              "u.find_spec('fleet_server') is None, u.find_spec('sqlite_utils') is None)", cwd=tmp_path)
    prefix, no_fastapi, no_server, no_sqlite_utils = out.split()
    assert Path(prefix) == agent / "opt/edge-agent"
    assert (no_fastapi, no_server, no_sqlite_utils) == ("True", "True", "True")
    # dulwich imports without its compiled accelerators and runs its pure-Python code
    out = run(python, "-c", "import sys, dulwich.pack, dulwich.objects, dulwich.diff_tree; "
              f"print(sorted(m for m in {list(agent_dropped_extensions())!r} if m in sys.modules), "
              "dulwich.pack.apply_delta.__module__)", cwd=tmp_path)
    assert out.split() == ["[]", "dulwich.pack"]
    # every module of the device package imports in the agent's venv, without the server's libraries
    out = run(python, "-c", "import importlib, pkgutil, edge_agent; "
              "names = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.')]; "
              "[importlib.import_module(n) for n in names]; print(len(names))", cwd=tmp_path)
    assert int(out) > 40
    # run as the package runs it (-OO): every module of its venv the daemon loads has shipped byte code
    out = run(python, "-B", "-OO", "-c",
              "import importlib.util, os, sys, edge_agent.cli, edge_agent.daemon, edge_core.gitclients; "
              "print(sys.flags.optimize, sorted(m.__file__ for m in list(sys.modules.values()) "
              "if (getattr(m, '__file__', None) or '').endswith('.py') and 'site-packages' in m.__file__ "
              "and not os.path.exists(importlib.util.cache_from_source(m.__file__, optimization=2))))",
              cwd=tmp_path)
    assert out.strip() == "2 []"
    server = extracted["fleet-server"] / "opt/fleet-server/bin/python"
    run(server, "-c", "import fastapi, uvicorn, prometheus_client, sqlite_utils, fleet_server.fleetctl",
        cwd=tmp_path)
    # the byte code names the installed paths, and no file remembers where the build happened
    site = agent / "opt/edge-agent/lib/python3.11/site-packages"
    pyc = site / "edge_agent/__pycache__/cli.cpython-311.opt-2.pyc"
    assert b"/opt/edge-agent/lib/python3.11/site-packages/edge_agent/cli.py" in pyc.read_bytes()
    for name, root in extracted.items():
        for dirpath, _dirs, files in os.walk(root / "opt" / name):
            for f in files:
                p = Path(dirpath) / f
                if not p.is_symlink() and "__pycache__" not in dirpath and p.suffix != ".so":
                    data = p.read_bytes()
                    assert b"/packaging/build" not in data, p
                    assert str(tmp_path.parent).encode() not in data, p


def test_default_agent_config_matches_the_schema(tmp_path: Path) -> None:
    shipped = PACKAGING / "agent.yaml"
    with pytest.raises(ConfigError, match=r"trust\.keys"):
        load_config(shipped)
    data = yaml.safe_load(shipped.read_text())
    data["trust"]["keys"] = [format_verify_key(SigningKey.generate().verify_key)]
    filled = tmp_path / "agent.yaml"
    filled.write_text(yaml.safe_dump(data))
    config = load_config(filled)
    assert config.profile == "generic-linux"
    assert config.profile_dirs == DEFAULT_PROFILE_DIRS
    assert Path("/usr/share/edge-agent/profiles") in DEFAULT_PROFILE_DIRS
    assert config.state_dir == Path("/var/lib/edge-agent")
    assert config.mode == "enforce"


def test_default_server_config_matches_the_schema() -> None:
    config = load_server_config(PACKAGING / "server.yaml")
    assert config.store.path == Path("/var/lib/fleet-server/fleet.db")
    assert config.git.cache_dir == Path("/var/cache/fleet-server/git")
    assert config.http.admin_token_file == Path("/etc/fleet-server/admin.token")
    assert config.git.url is None


def test_both_packages_ship_shell_completions_without_shtab(debs: dict[str, Path],
                                                            extracted: dict[str, Path]) -> None:
    for name, commands in (("edge-agent", ("edge-agent",)), ("fleet-server", ("fleetctl",))):
        files = listing(debs[name])
        for cmd in commands:
            for path in (f"/usr/share/bash-completion/completions/{cmd}",
                         f"/usr/share/zsh/vendor-completions/_{cmd}",
                         f"/usr/share/fish/vendor_completions.d/{cmd}.fish"):
                assert files[path][0] == "-rw-r--r--", path
        venv = f"/opt/{name}/lib/python3.11/site-packages"
        assert not any(p.startswith(f"{venv}/shtab") for p in files), "shtab must not be installed"
    bash = extracted["fleet-server"] / "usr/share/bash-completion/completions/fleetctl"
    text = bash.read_text()
    for word in ("rollout", "watch", "--http-timeout", "--json", "config"):
        assert word in text, word
    run("bash", "-n", str(bash))  # it parses
    fish = (extracted["edge-agent"] / "usr/share/fish/vendor_completions.d/edge-agent.fish").read_text()
    assert "plan" in fish
