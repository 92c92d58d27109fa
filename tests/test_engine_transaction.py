"""Transactions: health-check rollback byte for byte, mid-apply failure, prune, no-op, crash recovery."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from edge_agent.drivers.base import Change, Context, get_driver
from edge_agent.drivers.symlink import SymlinkDriver
from edge_agent.engine.health import CheckResult, run_checks
from edge_agent.engine.plan import make_plan
from edge_agent.engine.transaction import Outcome, apply_plan, clean_backup_store, recover, undo_entries
from edge_agent.fsafe_backup import referenced_blobs
from edge_agent.runner import Runner
from edge_agent.state import StateDB
from edge_core.errors import ConfinementError, DriverError
from edge_core.release import DesiredState
from edge_core.resources import Absent, CommandCheck, Directory, Symlink, SystemdUnit
from tests.support.fake_system import FakeSystem, make_context, tree_state
from tests.support.plans import UNIT_TEXT, ctx_for, desired_state, file_res

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def checks_of(desired: DesiredState, root: Path) -> Callable[[], list[CheckResult]]:
    def run() -> list[CheckResult]:
        return run_checks(desired.checks, Runner(), root)

    return run


_txn = iter(range(1_000_000))


def apply(desired: DesiredState, ctx: Context, state: StateDB, root: Path, version: int = 1) -> Outcome:
    c = ctx_for(ctx, desired)
    plan = make_plan(desired, state.managed(), c)
    return apply_plan(plan, desired, c, state, txn_id=f"t{next(_txn)}", version=version, commit=f"c{version}",
                      run_checks=checks_of(desired, root))


def release_one() -> DesiredState:
    p: dict[str, bytes] = {}
    return desired_state([
        Directory(id="d:app", bundle="web", path="/etc/app", mode=0o755),
        file_res("/etc/app/a.conf", b"alpha 1\n", p),
        file_res("/etc/app/b.conf", b"bravo 1\n", p, mode=0o640),
        Symlink(id="link", bundle="web", path="/etc/app/current", target="a.conf"),
    ], p)


def release_two(check_cmd: tuple[str, ...] | str) -> DesiredState:
    p: dict[str, bytes] = {}
    return desired_state([
        Directory(id="d:app", bundle="web", path="/etc/app", mode=0o700),
        file_res("/etc/app/a.conf", b"alpha 2\n", p, mode=0o600),
        # b.conf dropped: pruned (deleted; the agent created it)
        file_res("/etc/app/c.conf", b"charlie\n", p),
        file_res("/etc/new/deep/d.conf", b"delta\n", p),
        Symlink(id="link", bundle="web", path="/etc/app/current", target="c.conf"),
        Absent(id="gone", bundle="web", path="/etc/legacy"),
    ], p, checks=(("web", CommandCheck(name="smoke", run=check_cmd, timeout=5)),))


@pytest.mark.parametrize("check", [("false",), "test -e etc/app/ready"])
def test_failed_health_check_restores_the_previous_release_byte_for_byte(
    root: Path, state: StateDB, check: tuple[str, ...] | str,
) -> None:
    (root / "etc" / "legacy" / "sub").mkdir(parents=True)
    (root / "etc" / "legacy" / "sub" / "x").write_bytes(b"legacy data\n")
    os.symlink("sub/x", root / "etc" / "legacy" / "link")
    ctx = make_context(root, allowed_roots=("/etc",))
    first = release_one()
    out = apply(first, ctx, state, root)
    assert out.status == "applied", out
    assert out.changes >= 4
    before = tree_state(root)
    managed_before = state.managed()
    if isinstance(check, str):  # the health check runs in the agent's cwd; point it at the root
        check = f"cd {root} && {check}"

    out = apply(release_two(check), ctx, state, root, version=2)
    assert out.status == "rolled_back", out
    assert out.changes == 7  # every change was applied before the check failed
    assert out.step == "web/smoke"
    assert "smoke" in (out.reason or "")
    assert [c.ok for c in out.checks] == [False]
    assert tree_state(root) == before
    assert (root / "etc" / "app" / "b.conf").read_bytes() == b"bravo 1\n"
    assert (root / "etc" / "legacy" / "sub" / "x").read_bytes() == b"legacy data\n"
    assert state.managed() == managed_before
    assert state.open_txn() is None


def test_failing_change_in_the_middle_rolls_back_earlier_changes(root: Path, state: StateDB) -> None:
    (root / "etc" / "one.conf").write_bytes(b"one 0\n")
    os.chmod(root / "etc" / "one.conf", 0o644)
    ctx = make_context(root, allowed_roots=("/etc",))
    before = tree_state(root)
    p: dict[str, bytes] = {}
    # /etc/sub becomes a symlink before the file below it is written: the write must be refused
    desired = desired_state([
        file_res("/etc/one.conf", b"one 1\n", p),
        file_res("/etc/two.conf", b"two\n", p),
        Symlink(id="sub", bundle="b", path="/etc/sub", target="/tmp"),
        file_res("/etc/sub/three.conf", b"three\n", p),
    ], p)
    out = apply(desired, ctx, state, root)
    assert out.status == "rolled_back", out
    assert "/etc/sub/three.conf" in (out.step or "")
    assert "symlink" in (out.reason or "")
    assert tree_state(root) == before
    assert state.managed() == {}


def test_prune_restores_originals_and_deletes_what_the_agent_created(root: Path, state: StateDB) -> None:
    motd = root / "etc" / "motd"
    motd.write_bytes(b"hello from the vendor\n")
    os.chmod(motd, 0o640)
    same = root / "etc" / "same.conf"
    same.write_bytes(b"already right\n")
    os.chmod(same, 0o644)
    ctx = make_context(root, allowed_roots=("/etc",))
    p: dict[str, bytes] = {}
    first = desired_state([
        file_res("/etc/motd", b"managed motd\n", p, mode=0o644),
        file_res("/etc/created.conf", b"ours\n", p),
        file_res("/etc/same.conf", b"already right\n", p),
        file_res("/etc/kept.conf", b"kept\n", p),
    ], p)
    assert apply(first, ctx, state, root).status == "applied"
    managed = state.managed()
    assert managed["file:/etc/motd"].original is not None
    assert managed["file:/etc/motd"].original["kind"] == "file"
    assert managed["file:/etc/created.conf"].original["kind"] == "absent"
    assert managed["file:/etc/same.conf"].original["kind"] == "file"
    assert motd.read_bytes() == b"managed motd\n"

    second = desired_state([file_res("/etc/kept.conf", b"kept\n", {})], {"file:/etc/kept.conf": b"kept\n"})
    out = apply(second, ctx, state, root, version=2)
    assert out.status == "applied", out
    assert motd.read_bytes() == b"hello from the vendor\n"
    assert motd.stat().st_mode & 0o7777 == 0o640
    assert not (root / "etc" / "created.conf").exists()
    assert same.read_bytes() == b"already right\n"
    assert set(state.managed()) == {"file:/etc/kept.conf"}


def test_second_apply_of_the_same_state_is_a_noop_and_writes_nothing(root: Path, state: StateDB) -> None:
    ctx = make_context(root, allowed_roots=("/etc",))
    first = release_one()
    assert apply(first, ctx, state, root).status == "applied"
    stamps = {p: (p.lstat().st_mtime_ns, p.lstat().st_ctime_ns) for p in root.rglob("*")}
    plan = make_plan(first, state.managed(), ctx_for(ctx, first))
    assert plan.changes == ()
    assert plan.prune == ()
    assert set(plan.in_sync) == {r.id for r in first.resources}
    time.sleep(0.01)
    out = apply(first, ctx, state, root)
    assert out == Outcome("noop")
    assert {p: (p.lstat().st_mtime_ns, p.lstat().st_ctime_ns) for p in root.rglob("*")} == stamps


def test_refused_plan_touches_nothing(root: Path, state: StateDB, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    p: dict[str, bytes] = {}
    unit = SystemdUnit(id="u", bundle="b", name="x.service", content=UNIT_TEXT.decode(), running=True)
    p["u"] = UNIT_TEXT
    desired = desired_state([file_res("/etc/a", b"a\n", p), unit], p)
    ctx = make_context(root, allowed_roots=("/etc",))
    before = tree_state(root)
    out = apply(desired, ctx, state, root)
    assert out.status == "refused"
    assert "systemctl" in (out.reason or "")
    assert tree_state(root) == before
    assert state.open_txn() is None


def test_rollback_restores_unit_file_and_restarts_units(root: Path, state: StateDB, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystem.install(tmp_path, monkeypatch)
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "web.service").write_bytes(UNIT_TEXT)
    os.chmod(unit_dir / "web.service", 0o644)
    (root / "etc" / "web.conf").write_bytes(b"port 80\n")
    os.chmod(root / "etc" / "web.conf", 0o644)
    fake.set_unit("web.service", enabled="enabled", active="active")
    ctx = make_context(root, allowed_roots=("/etc",))
    before = tree_state(root)
    p: dict[str, bytes] = {}
    new_unit = UNIT_TEXT + b"Restart=always\n"
    unit = SystemdUnit(id="u:web", bundle="web", name="web.service", content=new_unit.decode(),
                       enabled=True, running=True, watch=("file:/etc/web.conf",))
    p[unit.id] = new_unit
    desired = desired_state([unit, file_res("/etc/web.conf", b"port 8080\n", p)], p,
                            checks=(("web", CommandCheck(name="http", run=("false",), timeout=5)),))
    fake.clear_calls()
    out = apply(desired, ctx, state, root)
    assert out.status == "rolled_back", out
    assert tree_state(root) == before
    calls = fake.calls("systemctl")
    restarts = [c for c in calls if c[1] == "try-restart"]
    assert len(restarts) == 2  # one for the new config, one after the old one was put back
    last_restart = max(i for i, c in enumerate(calls) if c[1] == "try-restart")
    last_reload = max(i for i, c in enumerate(calls) if c[1] == "daemon-reload")
    assert last_reload < last_restart
    assert fake.unit("web.service") == {"enabled": "enabled", "active": "active"}


def test_backup_store_keeps_only_referenced_blobs(root: Path, state: StateDB) -> None:
    (root / "etc" / "motd").write_bytes(b"vendor\n")
    ctx = make_context(root, allowed_roots=("/etc",))
    for version in range(1, 5):
        p: dict[str, bytes] = {}
        desired = desired_state([file_res("/etc/motd", f"v{version}\n".encode(), p)], p)
        assert apply(desired, ctx, state, root, version=version).status == "applied"
    blobs = set(os.listdir(ctx.backup_store))
    needed = referenced_blobs(state.backup_records())
    assert needed <= blobs
    state.prune_journal(0)
    clean_backup_store(state, ctx.backup_store)
    left = set(os.listdir(ctx.backup_store))
    assert left == referenced_blobs(state.backup_records())
    assert len(left) == 1  # the vendor's original of /etc/motd


# --- crash recovery --------------------------------------------------------------------------------

N_FILES = 300

_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edge_agent.engine.plan import make_plan
    from edge_agent.engine.transaction import apply_plan
    from edge_core.release import DesiredState
    from edge_core.resources import File
    from edge_agent.state import StateDB
    from tests.support.fake_system import make_context

    root, db, n, stop_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    add = StateDB.journal_add
    def journal_add(self, *args, **kwargs):  # stop right after recording entry ``stop_at``
        result = add(self, *args, **kwargs)
        journal_add.count += 1
        if journal_add.count == stop_at:
            import os, signal
            os.kill(os.getpid(), signal.SIGSTOP)  # the parent SIGKILLs it here
        return result
    journal_add.count = 0
    StateDB.journal_add = journal_add
    resources, payloads = [], {}
    for i in range(n):
        res = File(id=f"f{i}", bundle="b", path=f"/etc/data/f{i:03d}", mode=0o644, content="")
        resources.append(res)
        payloads[res.id] = (f"new {i}\\n" * 200).encode()
    desired = DesiredState(bundles=("b",), resources=tuple(resources), checks=(), payloads=payloads)
    ctx = make_context(root, payloads, allowed_roots=("/etc",))
    state = StateDB(db)
    plan = make_plan(desired, state.managed(), ctx)
    print("planned", flush=True)
    apply_plan(plan, desired, ctx, state, txn_id="crash", version=2, commit="c2", run_checks=list)
    print("finished", flush=True)
""")


def _old(i: int) -> bytes | None:
    return None if i % 3 == 0 else (f"old {i}\n" * 150).encode()


def _new(i: int) -> bytes:
    return (f"new {i}\n" * 200).encode()


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state ``T`` in /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


@pytest.mark.slow
def test_recovery_after_sigkill_leaves_every_file_wholly_old(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    torn_states = 0  # runs where the kill left a mix of old and new files
    for run in range(10):
        base = tmp_path / f"run{run}"
        root = base / "root"
        data = root / "etc" / "data"
        data.mkdir(parents=True)
        for i in range(N_FILES):
            old = _old(i)
            if old is not None:
                (data / f"f{i:03d}").write_bytes(old)
                os.chmod(data / f"f{i:03d}", 0o644)
        before = tree_state(root)
        db = base / "state.db"
        StateDB(db).close()
        kill_after = rng.randrange(0, N_FILES)
        # the child stops itself right after journal entry K (a loaded machine can no longer let it
        # run past the kill point before a watcher sees it); K = 0: killed as soon as it runs
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(db), str(N_FILES),
                                  str(kill_after)],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while (kill_after and time.monotonic() < deadline and child.poll() is None
                   and not _stopped(child.pid)):
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        out, err = child.stdout.read(), child.stderr.read()  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
        child.stderr.close()  # type: ignore[union-attr]
        assert b"finished" not in out, f"run {run}: the child finished before the kill (K={kill_after})"
        assert b"Traceback" not in err, err.decode()

        # before recovery: every file wholly old or wholly new
        new_files = 0
        for i in range(N_FILES):
            now = _read(data / f"f{i:03d}")
            assert now in (_old(i), _new(i)), f"run {run}: f{i:03d} is torn"
            new_files += now == _new(i)
        torn_states += 0 < new_files < N_FILES

        state = StateDB(db)
        ctx = make_context(root, allowed_roots=("/etc",))
        outcome = recover(state, ctx)
        if outcome is not None:
            assert outcome.status == "rolled_back", outcome
        assert state.open_txn() is None
        assert recover(state, ctx) is None
        for i in range(N_FILES):
            assert _read(data / f"f{i:03d}") == _old(i), f"run {run}: f{i:03d} not restored"
        assert tree_state(root) == before, f"run {run}: leftovers after recovery (K={kill_after})"
        state.close()
    assert torn_states >= 5, "the kills did not land in the middle of the transactions"


def test_undo_goes_newest_first(root: Path) -> None:
    """Two journaled changes of one path: undoing newest first ends with the oldest backup."""
    ctx = make_context(root, allowed_roots=("/etc",))
    target = root / "etc" / "twice.conf"
    target.write_bytes(b"original\n")
    first = ctx.fs.capture("/etc/twice.conf", ctx.backup_store)
    target.write_bytes(b"intermediate\n")
    second = ctx.fs.capture("/etc/twice.conf", ctx.backup_store)
    target.write_bytes(b"final\n")
    problems = undo_entries([("file", None, "update", [first]), ("file", None, "update", [second])], ctx)
    assert problems == []
    assert target.read_bytes() == b"original\n"


def test_foreign_exception_in_a_driver_is_undone_and_reported_as_one_line_driver_error(
    root: Path, state: StateDB, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A driver bug (a ValueError from the kind's own apply) becomes one driver error at
    ``Driver.apply``: the transaction undoes the earlier changes and reports one line."""
    (root / "etc" / "one.conf").write_bytes(b"one 0\n")
    os.chmod(root / "etc" / "one.conf", 0o644)
    ctx = make_context(root, allowed_roots=("/etc",))
    before = tree_state(root)

    def broken(self: SymlinkDriver, change: Change, ctx: Context) -> None:
        raise ValueError("unexpected\nsecond line of a foreign message")

    monkeypatch.setattr(SymlinkDriver, "_apply", broken)
    p: dict[str, bytes] = {}
    desired = desired_state([
        file_res("/etc/one.conf", b"one 1\n", p),
        file_res("/etc/two.conf", b"two\n", p),
        Symlink(id="link", bundle="b", path="/etc/current", target="one.conf"),
    ], p)
    with caplog.at_level(logging.INFO):
        out = apply(desired, ctx, state, root)
    assert out.status == "rolled_back", out
    assert out.reason == ("symlink: cannot create link: "
                          "ValueError: unexpected second line of a foreign message")
    assert "/etc/current" in (out.step or "")
    assert tree_state(root) == before
    assert state.managed() == {}
    assert state.open_txn() is None
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.exc_info]


def test_driver_entry_points_turn_foreign_exceptions_into_driver_errors(
    root: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every entry point of the contract wraps what is not the agent's own error; our own errors
    (a ConfinementError here) pass through unchanged."""
    ctx = make_context(root, allowed_roots=("/etc",))
    driver = get_driver("symlink")
    res = Symlink(id="link", bundle="b", path="/etc/current", target="x")
    change = Change("link", "symlink", "create", "create /etc/current", paths=("/etc/current",))

    def fail(*_args: object) -> NoReturn:
        raise KeyError("missing")

    for name in ("_observe", "_apply", "_snapshot", "_undo", "_spec_of"):
        monkeypatch.setattr(SymlinkDriver, name, fail)
    calls: list[Callable[[], object]] = [
        lambda: driver.observe(res, ctx), lambda: driver.apply(change, ctx),
        lambda: driver.snapshot(change, ctx), lambda: driver.undo(["not", "a", "record"], ctx),
        lambda: driver.spec_of(res, ctx),
    ]
    for call in calls:
        with pytest.raises(DriverError, match=r"^symlink: cannot \w+ .*: KeyError: 'missing'$") as info:
            call()
        assert isinstance(info.value.__cause__, KeyError)

    def refuse(*_args: object) -> NoReturn:
        raise ConfinementError("own")

    monkeypatch.setattr(SymlinkDriver, "_apply", refuse)
    with pytest.raises(ConfinementError, match=r"^own$"):
        driver.apply(change, ctx)
