"""Planning a desired state: ordering, watches, refresh-only commands, probes, rendering, prune order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from edge_agent.drivers.base import Context
from edge_agent.drivers.secret_file import expected_secret_id
from edge_agent.engine.plan import Plan, make_plan, order_resources, render_plan
from edge_agent.engine.transaction import apply_plan
from edge_agent.state import Managed, StateDB
from edge_core.release import DesiredState
from edge_core.resources import (
    CommandRes,
    Directory,
    SecretFile,
    SystemdUnit,
)
from edge_core.trust.sealed import open_sealed, seal
from tests.support.fake_system import FakeSystem, make_context
from tests.support.plans import UNIT_TEXT, ctx_for, desired_state, file_res


def device_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    return root


def actions(plan: Plan) -> list[tuple[str, str]]:
    return [(c.resource_id, c.action) for c in plan.changes]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    return FakeSystem.install(tmp_path, monkeypatch)


def test_directories_come_first_parents_before_children(tmp_path: Path) -> None:
    payloads: dict[str, bytes] = {}
    f = file_res("/etc/app/conf.d/x.conf", b"x\n", payloads)
    deep = Directory(id="d:deep", bundle="base", path="/etc/app/conf.d")
    top = Directory(id="d:top", bundle="base", path="/etc/app", mode=0o750)
    cmd = CommandRes(id="c", bundle="base", name="c", run=("true",))
    assert [r.id for r in order_resources([cmd, f, deep, top])] == ["d:top", "d:deep", f.id, "c"]
    desired = desired_state([f, deep, top], payloads)
    ctx = make_context(device_root(tmp_path), desired.payloads)
    plan = make_plan(desired, {}, ctx)
    assert [rid for rid, _ in actions(plan)] == ["d:top", "d:deep", f.id]
    assert plan.in_sync == ()
    assert not plan.unavailable
    # planning wrote nothing
    assert not (tmp_path / "root" / "etc" / "app").exists()


def _unit(watch: tuple[str, ...] = (), running: bool | None = True) -> SystemdUnit:
    return SystemdUnit(id="unit:web", bundle="base", name="web.service", content=UNIT_TEXT.decode(),
                       enabled=True, running=running, watch=watch)


def _web_setup(
    tmp_path: Path, fake: FakeSystem, conf: bytes, *, watch: tuple[str, ...] = ("file:/etc/web.conf",),
    running: bool | None = True,
) -> tuple[DesiredState, Context]:
    root = tmp_path / "root"
    if not root.exists():
        (root / "etc" / "systemd" / "system").mkdir(parents=True)
        (root / "etc" / "systemd" / "system" / "web.service").write_bytes(UNIT_TEXT)
        (root / "etc" / "web.conf").write_bytes(b"old\n")
        os.chmod(root / "etc" / "web.conf", 0o644)
        fake.set_unit("web.service", enabled="enabled", active="active")
    payloads: dict[str, bytes] = {}
    conf_res = file_res("/etc/web.conf", conf, payloads)
    unit = _unit(watch, running)
    payloads[unit.id] = UNIT_TEXT
    desired = desired_state([unit, conf_res], payloads)
    return desired, make_context(root, desired.payloads)


def test_watching_unit_restarts_after_the_watched_file(tmp_path: Path, fake: FakeSystem) -> None:
    desired, ctx = _web_setup(tmp_path, fake, b"new\n")
    plan = make_plan(desired, {}, ctx)
    assert actions(plan) == [("file:/etc/web.conf", "update"), ("unit:web", "restart")]
    assert "file:/etc/web.conf" in plan.changes[1].summary
    assert plan.in_sync == ()


def test_watch_by_path_also_triggers(tmp_path: Path, fake: FakeSystem) -> None:
    desired, ctx = _web_setup(tmp_path, fake, b"new\n", watch=("/etc/web.conf",))
    assert actions(make_plan(desired, {}, ctx)) == [("file:/etc/web.conf", "update"), ("unit:web", "restart")]


def test_no_restart_when_nothing_watched_changed(tmp_path: Path, fake: FakeSystem) -> None:
    desired, ctx = _web_setup(tmp_path, fake, b"old\n")
    plan = make_plan(desired, {}, ctx)
    assert plan.changes == ()
    assert set(plan.in_sync) == {"unit:web", "file:/etc/web.conf"}
    assert plan.is_noop


def test_no_restart_for_a_unit_not_meant_to_run(tmp_path: Path, fake: FakeSystem) -> None:
    desired, ctx = _web_setup(tmp_path, fake, b"new\n", running=None)
    fake.set_unit("web.service", enabled="enabled", active="inactive")
    plan = make_plan(desired, {}, ctx)
    # running undeclared: a watch restart is planned (systemctl try-restart only restarts a running unit)
    assert actions(plan) == [("file:/etc/web.conf", "update"), ("unit:web", "restart")]
    desired2, ctx2 = _web_setup(tmp_path, fake, b"new\n", running=False)
    assert actions(make_plan(desired2, {}, ctx2)) == [("file:/etc/web.conf", "update")]


def test_restart_applies_through_try_restart(tmp_path: Path, fake: FakeSystem, state: StateDB) -> None:
    desired, ctx = _web_setup(tmp_path, fake, b"new\n")
    plan = make_plan(desired, {}, ctx)
    fake.clear_calls()
    out = apply_plan(plan, desired, ctx, state, txn_id="t1", version=1, commit="c1", run_checks=list)
    assert out.status == "applied", out
    assert ["systemctl", "try-restart", "--", "web.service"] in fake.calls("systemctl")
    assert fake.state()["starts"]["web.service"] == 1


def _command_setup(tmp_path: Path, conf: bytes, **kw: object) -> tuple[DesiredState, Context]:
    root = tmp_path / "root"
    if not (root / "etc" / "app.conf").exists():
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "app.conf").write_bytes(b"old\n")
        os.chmod(root / "etc" / "app.conf", 0o644)
    payloads: dict[str, bytes] = {}
    conf_res = file_res("/etc/app.conf", conf, payloads)
    cmd = CommandRes(id="cmd:reload", bundle="base", name="reload", run="echo ran >> reloads",
                     watch=("file:/etc/app.conf",), **kw)  # type: ignore[arg-type]
    desired = desired_state([cmd, conf_res], payloads)
    return desired, make_context(root, desired.payloads)


def test_refresh_only_command_runs_only_when_watched_changed(tmp_path: Path) -> None:
    desired, ctx = _command_setup(tmp_path, b"old\n", refresh_only=True)
    plan = make_plan(desired, {}, ctx)
    assert plan.changes == ()
    assert "cmd:reload" in plan.in_sync
    desired, ctx = _command_setup(tmp_path, b"new\n", refresh_only=True)
    plan = make_plan(desired, {}, ctx)
    assert actions(plan) == [("file:/etc/app.conf", "update"), ("cmd:reload", "run")]


def test_guarded_command_with_watch_runs_when_watched_changed(tmp_path: Path, state: StateDB) -> None:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    (tmp_path / "root" / "done").write_text("")
    desired, ctx = _command_setup(tmp_path, b"old\n", creates="/done")
    assert make_plan(desired, {}, ctx).changes == ()
    desired, ctx = _command_setup(tmp_path, b"new\n", creates="/done")
    plan = make_plan(desired, {}, ctx)
    assert actions(plan) == [("file:/etc/app.conf", "update"), ("cmd:reload", "run")]
    out = apply_plan(plan, desired, ctx, state, txn_id="t", version=1, commit="c", run_checks=list)
    assert out.status == "applied", out
    assert (tmp_path / "root" / "reloads").read_text() == "ran\n"


def test_unavailable_driver_refuses_the_whole_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    payloads: dict[str, bytes] = {}
    f = file_res("/etc/a.conf", b"a\n", payloads)
    unit = _unit()
    payloads[unit.id] = UNIT_TEXT
    desired = desired_state([f, unit], payloads)
    ctx = make_context(device_root(tmp_path), desired.payloads)
    plan = make_plan(desired, {}, ctx)
    assert plan.changes == ()
    assert "systemctl" in plan.unavailable["systemd_unit"]
    assert "file" not in plan.unavailable
    assert not plan.is_noop
    assert "refused" in render_plan(plan)
    assert not (tmp_path / "root" / "etc" / "a.conf").exists()


def test_render_plan_shows_diffs_and_redacts_secrets(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    secret_text = b"hunter2-very-secret\n"
    res = SecretFile(id="secret:wifi", bundle="base", path="/etc/wifi.psk", mode=0o600,
                     secret="secrets/wifi-psk.sealed.json")
    sealed = seal(secret_text, secret_id="wifi-psk", version=1, recipients=[key.public_key])
    payloads = {res.id: sealed}
    f = file_res("/etc/motd", b"hello\nworld\n", payloads)
    root = device_root(tmp_path)
    (root / "etc" / "motd").write_bytes(b"hello\n")

    def opener(r: SecretFile, doc: bytes) -> bytes:
        return open_sealed(doc, expected_id=expected_secret_id(r), key=key)

    desired = desired_state([f, res], payloads)
    ctx = make_context(root, desired.payloads, open_secret=opener)
    plan = make_plan(desired, {}, ctx)
    text = render_plan(plan)
    assert "+world" in text
    assert "(secret content redacted)" in text
    assert "hunter2" not in text
    assert "hunter2" not in repr(plan)
    assert text.strip().endswith("2 changes (0 prune), 0 resources in sync")


def test_prune_comes_last_files_before_their_directory(tmp_path: Path, state: StateDB) -> None:
    root = device_root(tmp_path)
    payloads: dict[str, bytes] = {}
    d = Directory(id="d:app", bundle="base", path="/etc/app")
    f = file_res("/etc/app/a.conf", b"a\n", payloads)
    keep = file_res("/etc/keep.conf", b"k\n", payloads)
    first = desired_state([d, f, keep], payloads)
    ctx = make_context(root, first.payloads)
    out = apply_plan(make_plan(first, {}, ctx), first, ctx, state, txn_id="t1", version=1, commit="c1",
                     run_checks=list)
    assert out.status == "applied", out
    managed: dict[str, Managed] = state.managed()
    assert set(managed) == {"d:app", f.id, keep.id}
    second = desired_state([keep], {keep.id: payloads[keep.id]})
    plan = make_plan(second, managed, ctx_for(ctx, second))
    assert plan.changes == ()
    assert plan.in_sync == (keep.id,)
    assert [(c.resource_id, c.action) for c in plan.prune] == [(f.id, "delete"), ("d:app", "delete")]
    assert "prune delete" in render_plan(plan)
