"""systemd, sysctl and command drivers against stand-in systemctl/sysctl on PATH (calls recorded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.drivers import Context, get_driver
from edge_agent.drivers.base import probe_kinds
from edge_agent.drivers.systemd import restart_change
from edge_agent.errors import ApplyError
from edge_core.resources import CommandRes, Sysctl, SystemdUnit
from tests.support.driver_calls import apply, plan
from tests.support.fake_system import FakeSystem, make_context

UNIT = b"[Service]\nExecStart=/usr/bin/app\n"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    return FakeSystem.install(tmp_path, monkeypatch)


@pytest.fixture
def root(tmp_path: Path, fake: FakeSystem) -> Path:
    r = tmp_path / "device"
    (r / "etc/systemd/system").mkdir(parents=True)
    (r / "etc/sysctl.d").mkdir()
    fake.add_unit_dir(r / "etc/systemd/system")
    return r


@pytest.fixture
def ctx(root: Path) -> Iterator[Context]:
    c = make_context(root, {"app": UNIT})
    yield c
    c.fs.close()


def app(**kw: object) -> SystemdUnit:
    return SystemdUnit(id="app", bundle="b", name="app.service", content=UNIT.decode(), **kw)  # type: ignore[arg-type]


def test_unit_install_enable_start_then_noop(root: Path, ctx: Context, fake: FakeSystem) -> None:
    changes = plan(app(enabled=True, running=True), ctx)
    assert [c.action for c in changes] == ["create", "daemon-reload", "enable", "start"]
    assert fake.calls() == [["systemctl", "is-enabled", "--", "app.service"],
                            ["systemctl", "is-active", "--", "app.service"]]
    fake.clear_calls()
    apply(changes, ctx)
    verbs = [c[1:] for c in fake.calls() if c[1] not in ("is-enabled", "is-active")]
    assert verbs == [["daemon-reload"], ["enable", "--", "app.service"], ["start", "--", "app.service"]]
    assert (root / "etc/systemd/system/app.service").read_bytes() == UNIT
    assert fake.unit("app.service") == {"enabled": "enabled", "active": "active"}
    assert plan(app(enabled=True, running=True), ctx) == []


def test_changed_unit_file_of_a_running_unit_reloads_and_restarts(root: Path, ctx: Context,
                                                                  fake: FakeSystem) -> None:
    (root / "etc/systemd/system/app.service").write_bytes(b"[Service]\nExecStart=/usr/bin/old\n")
    fake.set_unit("app.service", enabled="enabled", active="active")
    changes = plan(app(enabled=True), ctx)
    assert [c.action for c in changes] == ["update", "daemon-reload", "restart"]
    assert "+ExecStart=/usr/bin/app" in changes[0].diff
    fake.clear_calls()
    apply(changes, ctx)
    assert ["systemctl", "try-restart", "--", "app.service"] in fake.calls()
    assert fake.state()["starts"]["app.service"] == 1


def test_stop_and_disable(ctx: Context, fake: FakeSystem) -> None:
    fake.set_unit("other.service", enabled="enabled", active="active")
    res = SystemdUnit(id="o", bundle="b", name="other.service", enabled=False, running=False)
    changes = plan(res, ctx)
    assert [c.action for c in changes] == ["disable", "stop"]
    apply(changes, ctx)
    assert fake.unit("other.service") == {"enabled": "disabled", "active": "inactive"}


def test_failed_start_raises_and_undo_restores_the_unit(root: Path, ctx: Context, fake: FakeSystem) -> None:
    fake.set_unit("app.service", enabled="disabled", active="inactive")
    (root / "etc/systemd/system/app.service").write_bytes(UNIT)
    fake.fail_start("app.service")
    d = get_driver("systemd_unit")
    changes = plan(app(enabled=True, running=True), ctx)
    assert [c.action for c in changes] == ["enable", "start"]
    journal = [d.snapshot(changes[0], ctx)]
    d.apply(changes[0], ctx)
    journal.append(d.snapshot(changes[1], ctx))
    with pytest.raises(ApplyError, match=r"start app\.service failed with exit code 1: Job for app\.service"):
        d.apply(changes[1], ctx)
    assert fake.unit("app.service") == {"enabled": "enabled", "active": "failed"}
    for records in reversed(journal):
        for r in reversed(records):
            d.undo(r, ctx)
    assert fake.unit("app.service") == {"enabled": "disabled", "active": "failed"}
    assert ["systemctl", "disable", "--", "app.service"] in fake.calls()


def test_restart_change_only_restarts_a_running_unit(ctx: Context, fake: FakeSystem) -> None:
    fake.set_unit("app.service", enabled="enabled", active="inactive")
    apply([restart_change(app(), "config changed")], ctx)
    assert "starts" not in fake.state()
    fake.set_unit("app.service", enabled="enabled", active="active")
    apply([restart_change(app(), "config changed")], ctx)
    assert fake.state()["starts"]["app.service"] == 1


def test_probes(ctx: Context, fake: FakeSystem, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert probe_kinds(["systemd_unit", "sysctl", "file"], ctx) == {}
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert probe_kinds(["systemd_unit", "sysctl", "file"], ctx) == {
        "systemd_unit": "systemctl not found on PATH", "sysctl": "sysctl not found on PATH"}


def test_sysctl_set_persist_and_whitespace(root: Path, ctx: Context, fake: FakeSystem) -> None:
    fake.set_sysctl("net.ipv4.tcp_rmem", "4096\t87380\t6291456")
    same = Sysctl(id="s", bundle="b", name="net.ipv4.tcp_rmem", value="4096 87380  6291456", persist=False)
    assert plan(same, ctx) == []
    assert fake.calls() == [["sysctl", "-n", "--", "net.ipv4.tcp_rmem"]]
    fake.set_sysctl("net.ipv4.ip_forward", "0")
    res = Sysctl(id="f", bundle="b", name="net.ipv4.ip_forward", value="1")
    changes = plan(res, ctx)
    assert [c.action for c in changes] == ["set", "create"]
    fake.clear_calls()
    journal = apply(changes, ctx)
    assert ["sysctl", "-w", "--", "net.ipv4.ip_forward=1"] in fake.calls()
    assert fake.sysctl("net.ipv4.ip_forward") == "1"
    dropin = root / "etc/sysctl.d/60-edge-fleet-net.ipv4.ip_forward.conf"
    assert dropin.read_text() == "net.ipv4.ip_forward = 1\n"
    assert plan(res, ctx) == []
    d = get_driver("sysctl")
    assert journal[0] == [{"type": "sysctl", "name": "net.ipv4.ip_forward", "value": "0"}]
    for records in reversed(journal):
        for r in reversed(records):
            d.undo(r, ctx)
    assert fake.sysctl("net.ipv4.ip_forward") == "0"
    assert not dropin.exists()


def test_sysctl_unknown_or_readonly_fails_at_apply(ctx: Context, fake: FakeSystem) -> None:
    [change] = plan(Sysctl(id="x", bundle="b", name="net.nope.key", value="1", persist=False), ctx)
    assert "unreadable" in change.summary
    with pytest.raises(ApplyError, match=r"cannot stat /proc/sys/net/nope/key"):
        get_driver("sysctl").apply(change, ctx)
    fake.set_sysctl("kernel.ro", "0")
    fake.set_readonly("kernel.ro")
    [change] = plan(Sysctl(id="r", bundle="b", name="kernel.ro", value="1", persist=False), ctx)
    with pytest.raises(ApplyError, match=r"exit code 255: sysctl: permission denied on key 'kernel\.ro'"):
        get_driver("sysctl").apply(change, ctx)


def test_command_guards(root: Path, ctx: Context) -> None:
    (root / "var").mkdir()
    run = 'echo x >> "$EDGE_FLEET_ROOT/var/log"'
    assert plan(CommandRes(id="c", bundle="b", name="c", run=run, creates="/var"), ctx) == []
    assert plan(CommandRes(id="c", bundle="b", name="c", run=run, unless="true"), ctx) == []
    assert plan(CommandRes(id="c", bundle="b", name="c", run=run, onlyif=("false",)), ctx) == []
    guarded = CommandRes(id="c", bundle="b", name="c", run=run, onlyif='test -d "$EDGE_FLEET_ROOT/var"',
                         unless=("sh", "-c", 'test -s "$EDGE_FLEET_ROOT/var/log"'))
    [change] = plan(guarded, ctx)
    assert change.action == "run"
    assert get_driver("command").snapshot(change, ctx) == []
    apply([change], ctx)
    assert (root / "var/log").read_text() == "x\n"
    assert plan(guarded, ctx) == []


def test_command_runs_in_the_root_and_reports_failures(root: Path, ctx: Context) -> None:
    res = CommandRes(id="c", bundle="b", name="pwd",
                     run='pwd > pwd.txt; echo first >&2; echo "last words" >&2; exit 4')
    [change] = plan(res, ctx)
    with pytest.raises(ApplyError, match="command pwd exited with code 4: last words"):
        apply([change], ctx)
    assert (root / "pwd.txt").read_text().strip() == str(root)
    slow = CommandRes(id="s", bundle="b", name="slow", run=("sleep", "30"), timeout=0.3)
    with pytest.raises(ApplyError, match=r"command slow timed out after 0\.3s"):
        apply(plan(slow, ctx), ctx)
