"""Names that reach ``systemctl``/``sysctl`` argv can never be read as options.

The attack: a ``systemd_unit`` named ``-Hattacker.service`` (``systemctl -H`` talks to another
host) or a sysctl named ``-p.conf`` (``sysctl -p`` loads a file) reached argv as an option. Names
with a leading ``-`` are now refused at parse time (so by lint and the agent alike) and every argv
carries ``--`` before its operands; the argv-recording stand-ins show both.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.drivers import Context, get_driver
from edge_agent.engine.health import run_check
from edge_agent.runner import Runner
from edge_core.errors import BundleError
from edge_core.resources import Sysctl, SystemdActiveCheck, SystemdUnit, parse_check, parse_resource
from fleet_server.lint import lint_repo
from tests.support.driver_calls import apply, plan
from tests.support.fake_system import FakeSystem, make_context

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "config-repo"
SHIPPED = ROOT / "device_profiles"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"kind": "systemd_unit", "name": "-Hattacker.service", "running": True},
         "invalid systemd unit name '-Hattacker.service': a name must not start with '-'"),
        ({"kind": "systemd_unit", "name": "--root=.service", "enabled": True}, "must not start with '-'"),
        ({"kind": "sysctl", "name": "-p.conf", "value": "1"},
         "invalid sysctl name '-p.conf': a name must not start with '-'"),
        ({"kind": "sysctl", "name": "-a.b", "value": "1"}, "must not start with '-'"),
    ],
)
def test_leading_dash_names_are_refused_at_parse_time(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(BundleError, match=fragment.replace("(", r"\(")) as info:
        parse_resource(raw, "b", ("resources", 0))
    assert info.value.where == ("resources", 0, "name")


def test_leading_dash_unit_in_a_health_check_is_refused() -> None:
    with pytest.raises(BundleError, match="must not start with '-'"):
        parse_check({"kind": "systemd_active", "unit": "-Hattacker.service"}, ("health", 0))


def test_lint_reports_leading_dash_names_with_their_lines(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "bundles" / "attack").mkdir()
    (repo / "bundles" / "attack" / "bundle.yaml").write_text(
        "targets: [{profiles: [generic-linux]}]\nresources:\n"
        "  - kind: systemd_unit\n    name: -Hattacker.service\n    running: true\n"
        "  - kind: sysctl\n    name: -p.conf\n    value: \"1\"\n"
        "health:\n  - kind: systemd_active\n    unit: -Hx.service\n")
    found = {(p.line, p.reason) for p in lint_repo(repo, [SHIPPED]) if p.file == "bundles/attack/bundle.yaml"}
    assert found == {
        (4, "invalid systemd unit name '-Hattacker.service': a name must not start with '-'"),
        (7, "invalid sysctl name '-p.conf': a name must not start with '-'"),
        (11, "invalid systemd unit name '-Hx.service': a name must not start with '-'"),
    }


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    return FakeSystem.install(tmp_path, monkeypatch)


@pytest.fixture
def ctx(tmp_path: Path, fake: FakeSystem) -> Iterator[Context]:
    root = tmp_path / "device"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/sysctl.d").mkdir()
    fake.add_unit_dir(root / "etc/systemd/system")
    c = make_context(root, {"u": b"[Service]\nExecStart=/usr/bin/app\n"})
    yield c
    c.fs.close()


def operands_follow_double_dash(call: list[str], names: set[str]) -> bool:
    """Every name of ``names`` in ``call`` comes after a ``--``."""
    return all("--" in call[:i] for i, arg in enumerate(call) if arg in names or arg.split("=")[0] in names)


def test_every_systemctl_and_sysctl_argv_carries_double_dash(ctx: Context, fake: FakeSystem) -> None:
    fake.set_sysctl("net.ipv4.ip_forward", "0")
    unit = SystemdUnit(id="u", bundle="b", name="app.service", content="x", enabled=True, running=True)
    key = Sysctl(id="k", bundle="b", name="net.ipv4.ip_forward", value="1")
    records = apply(plan(unit, ctx) + plan(key, ctx), ctx)
    for rec in reversed([r for rs in records for r in rs]):
        get_driver("systemd_unit" if rec.get("type") != "sysctl" else "sysctl").undo(rec, ctx)
    assert run_check("b", SystemdActiveCheck(name="a", unit="app.service"), Runner(), ctx.fs.root).detail
    calls = fake.calls()
    named = [c for c in calls if c[1:] != ["daemon-reload"]]
    assert {c[1] for c in named if c[0] == "systemctl"} >= {"is-enabled", "is-active", "enable", "start",
                                                            "disable", "stop"}
    assert {c[1] for c in named if c[0] == "sysctl"} == {"-n", "-w"}
    names = {"app.service", "net.ipv4.ip_forward"}
    assert [c for c in named if not operands_follow_double_dash(c, names)] == []
    assert fake.unit("app.service") == {"enabled": "disabled", "active": "inactive"}
    assert fake.sysctl("net.ipv4.ip_forward") == "0"


def test_stand_ins_read_double_dash_like_the_real_tools(ctx: Context, fake: FakeSystem) -> None:
    """After ``--`` a leading ``-`` is an operand: the stand-in looks up the name, not an option."""
    fake.set_sysctl("net.core.somaxconn", "128")
    assert Runner().run(["sysctl", "-n", "--", "net.core.somaxconn"], timeout=10).stdout.strip() == "128"
    missing = Runner().run(["sysctl", "-n", "--", "-p.conf"], timeout=10)
    assert missing.returncode == 255
    assert "cannot stat /proc/sys/-p/conf" in missing.stderr
    unit = Runner().run(["systemctl", "is-active", "--", "-H.service"], timeout=10)
    assert unit.stdout.strip() == "inactive"
