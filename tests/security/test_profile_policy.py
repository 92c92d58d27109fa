"""What a device profile lets a release run: health checks, units, sysctl keys and modes.

The attack: on the shipped ``gateway`` profile, which forbids ``command`` resources, a bundle's
``command`` health check ran as root, ``fleetctl lint`` said nothing, and units (``ExecStart=``)
and sysctl keys (``kernel.core_pattern``) could run code the profile never named.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.agent import status, sync_once
from edge_agent.config import load_config
from edge_core.errors import ConfigError, ConfinementError, DriverUnavailable
from edge_core.policy import check_refusal, resource_refusal, unit_names_of
from edge_core.profiles import MODE_OPT_INS, DeviceProfile, load_profile, parse_profile
from edge_core.release import DeviceIdentity, select
from edge_core.resources import CommandCheck, File, SecretFile, parse_resource
from fleet_server.lint import lint_repo
from tests.support.agent_fleet import AgentFleet, bundle, snapshot

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "device_profiles"
EXAMPLE = ROOT / "examples" / "config-repo"
GATEWAY = load_profile("gateway", [SHIPPED])
GENERIC = load_profile("generic-linux", [SHIPPED])
GW = DeviceIdentity("gw-1", {"role": "gateway"}, "gateway")
SRV = DeviceIdentity("srv-1", {"role": "server"}, "generic-linux")


def tree_of(bundle_yaml: str) -> dict[str, bytes]:
    return {"bundles/b/bundle.yaml": bundle_yaml.encode()}


def lint_bundle(tmp_path: Path, bundle_yaml: str) -> list[tuple[str, int, str]]:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "bundles" / "attack").mkdir()
    (repo / "bundles" / "attack" / "bundle.yaml").write_text(bundle_yaml)
    return [(p.file, p.line, p.reason) for p in lint_repo(repo, [SHIPPED]) if p.severity == "error"]


HEALTH_BYPASS = """\
targets:
  - profiles: [gateway]
resources:
  - {kind: file, path: /etc/edge-gateway/app.conf, content: "x\\n"}
health:
  - kind: command
    name: pwn
    run: [/bin/sh, -c, "id > /tmp/pwned"]
"""


def test_command_health_check_on_gateway_is_refused_by_lint_and_select(tmp_path: Path) -> None:
    message = ("health check 'pwn': kind 'command' is not allowed by device profile 'gateway' "
               "(health_checks: disk_free, http, memory, systemd_active, tcp, temperature)")
    assert lint_bundle(tmp_path, HEALTH_BYPASS) == [("bundles/attack/bundle.yaml", 6, message)]
    with pytest.raises(DriverUnavailable) as info:
        select(tree_of(HEALTH_BYPASS), GW, GATEWAY)
    assert str(info.value) == f"bundles/b/bundle.yaml: {message}"
    # generic-linux runs commands of the release anyway, and says so
    assert select(tree_of(HEALTH_BYPASS.replace("gateway]", "generic-linux]").replace(
        "/etc/edge-gateway/app.conf", "/srv/app.conf")), SRV, GENERIC).checks[0][1].kind == "command"


def use_gateway_profile(fleet: AgentFleet) -> None:
    """Point the device of ``fleet`` at the shipped gateway profile."""
    doc = yaml.safe_load(fleet.config_path.read_text())
    doc.update(profile="gateway", profile_dirs=[str(SHIPPED)])
    fleet.config_path.write_text(yaml.safe_dump(doc))
    fleet.config = load_config(fleet.config_path)
    (fleet.root / "etc" / "edge-gateway").mkdir()


def test_command_health_check_on_gateway_is_refused_by_a_real_sync(fleet: AgentFleet) -> None:
    use_gateway_profile(fleet)
    ran = fleet.tmp / "health-check-ran"
    stand_in = fleet.tmp / "stand-in-check"
    stand_in.write_text(f"#!{sys.executable}\nopen({str(ran)!r}, 'a').write('ran\\n')\n")
    stand_in.chmod(0o755)
    before = snapshot(fleet.root)
    commit = fleet.publish({"bundles/app/bundle.yaml": bundle(
        [{"kind": "file", "path": "/etc/edge-gateway/app.conf", "content": "x\n"}],
        health=[{"kind": "command", "name": "pwn", "run": [str(stand_in)]}])})
    result = sync_once(fleet.config)
    assert result.outcome == "refused", result
    assert result.commit == commit
    assert result.reason == ("bundles/app/bundle.yaml: health check 'pwn': kind 'command' is not allowed "
                             "by device profile 'gateway' (health_checks: disk_free, http, memory, "
                             "systemd_active, tcp, temperature)")
    assert snapshot(fleet.root) == before
    assert not ran.exists()
    assert status(fleet.config)["installed"] is None


@pytest.mark.parametrize(
    ("resource", "error", "fragment"),
    [
        ("{kind: systemd_unit, name: debug-shell.service, running: true}", DriverUnavailable,
         "systemd unit 'debug-shell.service' is not allowed by device profile 'gateway' (systemd_units: "
         "gateway-*.service, gateway-*.timer)"),
        ("{kind: systemd_unit, name: sshd.service, content: \"[Service]\\nExecStart=/bin/sh\\n\"}",
         DriverUnavailable, "systemd unit 'sshd.service' is not allowed"),
        ("{kind: file, path: /etc/systemd/system/ssh.service.d/override.conf, content: x}", ConfinementError,
         "configures systemd unit 'ssh.service', which device profile 'gateway' does not allow"),
        ("{kind: symlink, path: /etc/systemd/system/multi-user.target.wants/gateway-x.service, "
         "target: /opt/gateway/x.service}", ConfinementError, "configures systemd unit 'multi-user.target'"),
        ("{kind: sysctl, name: kernel.core_pattern, value: \"|/opt/gateway/pwn\"}", DriverUnavailable,
         "sysctl key 'kernel.core_pattern' is not allowed by device profile 'gateway' (sysctl_keys: "
         "net.core.*, net.ipv4.*, net.ipv6.*)"),
        ("{kind: sysctl, name: kernel.modprobe, value: /opt/gateway/pwn, persist: false}", DriverUnavailable,
         "sysctl key 'kernel.modprobe' is not allowed"),
        ("{kind: file, path: /etc/sysctl.d/99-pwn.conf, content: \"kernel.core_pattern = |/x\\n\"}",
         ConfinementError, "/etc/sysctl.d/99-pwn.conf is a sysctl configuration file"),
    ],
)
def test_units_and_sysctl_keys_outside_the_gateway_patterns_are_refused(
        tmp_path: Path, resource: str, error: type[Exception], fragment: str) -> None:
    text = f"targets:\n  - profiles: [gateway]\nresources:\n  - {resource}\n"
    with pytest.raises(error) as info:
        select(tree_of(text), GW, GATEWAY)
    assert fragment in str(info.value)
    [(file, line, reason)] = lint_bundle(tmp_path, text)
    assert (file, line) == ("bundles/attack/bundle.yaml", 4)
    assert str(info.value) == f"bundles/b/bundle.yaml: {reason}"
    assert select(tree_of(text.replace("gateway]", "generic-linux]")), SRV, GENERIC).resources


def test_units_and_keys_inside_the_gateway_patterns_are_allowed() -> None:
    text = ("targets: [{all: true}]\nresources:\n"
            "  - {kind: systemd_unit, name: gateway-app.service, content: \"[Service]\\n\", running: true}\n"
            "  - {kind: file, path: /etc/systemd/system/gateway-app.service.d/limits.conf, content: x}\n"
            "  - {kind: sysctl, name: net.ipv4.ip_forward, value: \"1\"}\n"
            "health:\n  - {kind: systemd_active, unit: gateway-app.service}\n")
    assert len(select(tree_of(text), GW, GATEWAY).resources) == 3


def test_unit_names_of_paths() -> None:
    assert unit_names_of("/etc/systemd/system/a.service") == ("a.service",)
    assert unit_names_of("/etc/systemd/system/a.service.d/x.conf") == ("a.service",)
    assert unit_names_of("/usr/lib/systemd/user/t.target.wants/b.service") == ("t.target", "b.service")
    assert unit_names_of("/etc/systemd/journald.conf") == ()
    assert unit_names_of("/etc/systemd/systemd.conf") == ()


MODES = [
    ("{kind: file, path: /opt/gateway/bin/su, content: x, mode: \"4755\"}", "setuid"),
    ("{kind: file, path: /opt/gateway/bin/sg, content: x, mode: \"2755\"}", "setgid"),
    ("{kind: directory, path: /opt/gateway/drop, mode: \"0777\"}", "world_writable"),
    ("{kind: file, path: /etc/edge-gateway/hook, content: x, mode: \"0666\"}", "world_writable"),
    ("{kind: secret_file, path: /etc/edge-gateway/token, secret: secrets/t.sealed.json, mode: \"0666\"}",
     "world_writable"),
    ("{kind: secret_file, path: /etc/edge-gateway/token, secret: secrets/t.sealed.json, mode: \"0644\"}",
     "world_readable_secret"),
]


@pytest.mark.parametrize(("resource", "opt_in"), MODES)
def test_dangerous_modes_are_refused_unless_the_profile_opts_in(tmp_path: Path, resource: str,
                                                                 opt_in: str) -> None:
    raw = yaml.safe_load(resource)
    res = parse_resource(raw, "b")
    refusal = resource_refusal(res, GATEWAY)
    assert refusal is not None
    assert f"(allow_modes: [{opt_in}] opts in)" in refusal.message
    text = f"targets:\n  - profiles: [gateway]\nresources:\n  - {resource}\n"
    tree = {**tree_of(text), "secrets/t.sealed.json": b"{}"}
    with pytest.raises(DriverUnavailable, match="refuses"):
        select(tree, GW, GATEWAY)
    assert any(line == 4 and refusal.message == reason for _f, line, reason in lint_bundle(tmp_path, text))
    opted = DeviceProfile(name="gw", allowed_roots=GATEWAY.allowed_roots, drivers=GATEWAY.drivers, health=(),
                          allow_modes=MODE_OPT_INS)
    assert resource_refusal(res, opted) is None


def test_safe_modes_pass() -> None:
    app = File(id="f", bundle="b", path="/opt/gateway/bin/app", mode=0o755)
    assert resource_refusal(app, GATEWAY) is None
    assert resource_refusal(SecretFile(id="s", bundle="b", path="/etc/edge-gateway/t", mode=0o640,
                                       secret="secrets/t.sealed.json"), GATEWAY) is None


BASE: dict[str, Any] = {"name": "p", "allowed_roots": ["/srv"]}


def test_absent_profile_keys_take_the_safe_defaults() -> None:
    declarative = parse_profile({**BASE, "drivers": ["file", "systemd_unit", "sysctl"]})
    assert "command" not in declarative.check_kinds
    assert declarative.systemd_units == ()
    assert declarative.sysctl_keys == ()
    assert declarative.allow_modes == frozenset()
    refusal = check_refusal(CommandCheck(name="c", run=("true",)), declarative)
    assert refusal is not None
    assert "health_checks" in refusal.message
    unit = parse_resource({"kind": "systemd_unit", "name": "a.service", "running": True}, "b")
    refusal = resource_refusal(unit, declarative)
    assert refusal is not None
    assert refusal.reason.endswith("(systemd_units: none)")
    # a profile that already runs the release's commands allows command checks by default
    assert "command" in parse_profile({**BASE, "drivers": ["file", "command"]}).check_kinds


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"allow_modes": ["suid"]}, "unknown value 'suid'"),
        ({"health_checks": ["ping"]}, "unknown value 'ping'"),
        ({"systemd_units": "gateway-*.service"}, "must be a list of strings"),
        ({"sysctl_keys": ["net ipv4"]}, "invalid pattern"),
    ],
)
def test_bad_profile_keys_are_config_errors(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_profile({**BASE, "drivers": ["file"], **extra})


def test_shipped_gateway_runs_no_code_kind() -> None:
    assert "command" not in GATEWAY.drivers
    assert "command" not in GATEWAY.check_kinds
    assert all(p.startswith("gateway-") for p in GATEWAY.systemd_units)
    assert all(p.startswith("net.") for p in GATEWAY.sysctl_keys)
    assert GATEWAY.allow_modes == frozenset()
