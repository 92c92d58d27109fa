"""A missing parent directory is captured once per transaction: by the change that creates it.

Later changes writing into it journal only their own path; a rollback, a crash recovery and a
prune still leave the device exactly as it was before the transaction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.engine.health import CheckResult
from edge_agent.engine.plan import make_plan
from edge_agent.engine.transaction import apply_plan, recover
from edge_agent.state import StateDB
from edge_core.release import DesiredState
from tests.support.fake_system import make_context, tree_state
from tests.support.plans import ctx_for, desired_state, file_res


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc" / "kept").mkdir(parents=True)
    (r / "etc" / "kept" / "old.conf").write_bytes(b"old\n")
    return r


def three_files_in_new_dirs() -> DesiredState:
    p: dict[str, bytes] = {}
    return desired_state([
        file_res("/etc/new/deep/a.conf", b"alpha\n", p),
        file_res("/etc/new/deep/b.conf", b"bravo\n", p),
        file_res("/etc/new/c.conf", b"charlie\n", p),
        file_res("/etc/kept/d.conf", b"delta\n", p),
    ], p)


def _journal(state: StateDB) -> list[list[str]]:
    txn = state.open_txn()
    assert txn is not None
    return [[r["path"] for r in e.backup] for e in sorted(txn.entries, key=lambda e: e.seq)]


def test_later_changes_do_not_capture_the_parents_an_earlier_one_created(root: Path, state: StateDB) -> None:
    desired = three_files_in_new_dirs()
    ctx = ctx_for(make_context(root, allowed_roots=("/etc",)), desired)
    plan = make_plan(desired, state.managed(), ctx)
    assert [c.paths for c in plan.all_changes][:3] == [
        ("/etc/new", "/etc/new/deep", "/etc/new/deep/a.conf"),
        ("/etc/new", "/etc/new/deep", "/etc/new/deep/b.conf"),
        ("/etc/new", "/etc/new/c.conf"),
    ]
    journals: list[list[list[str]]] = []

    def failing_check() -> list[CheckResult]:
        journals.append(_journal(state))
        return [CheckResult("base", "smoke", "command", False, "exit status 1", 0.0)]

    before = tree_state(root)
    out = apply_plan(plan, desired, ctx, state, txn_id="t1", version=1, commit="c1", run_checks=failing_check)
    assert out.status == "rolled_back", out
    assert journals == [[
        ["/etc/new", "/etc/new/deep", "/etc/new/deep/a.conf"],
        ["/etc/new/deep/b.conf"],
        ["/etc/new/c.conf"],
        ["/etc/kept/d.conf"],
    ]]
    assert tree_state(root) == before
    assert not (root / "etc" / "new").exists()


def test_recovery_and_prune_remove_what_the_transaction_created(root: Path, state: StateDB) -> None:
    desired = three_files_in_new_dirs()
    ctx = ctx_for(make_context(root, allowed_roots=("/etc",)), desired)
    before = tree_state(root)

    def power_cut() -> list[CheckResult]:
        raise KeyboardInterrupt  # every change is made; the process dies before the commit

    with pytest.raises(KeyboardInterrupt):
        apply_plan(make_plan(desired, state.managed(), ctx), desired, ctx, state, txn_id="t1", version=1,
                   commit="c1", run_checks=power_cut)
    assert _journal(state)[1] == ["/etc/new/deep/b.conf"]
    assert (root / "etc" / "new" / "deep" / "b.conf").exists()
    out = recover(state, ctx)  # the next start
    assert out is not None
    assert out.status == "rolled_back", out
    assert tree_state(root) == before

    again = make_plan(desired, state.managed(), ctx)
    applied = apply_plan(again, desired, ctx, state, txn_id="t2", version=1, commit="c1", run_checks=list)
    assert applied.status == "applied", applied
    assert state.managed()["file:/etc/new/deep/b.conf"].original is not None
    empty = desired_state([], {})
    ctx2 = ctx_for(ctx, empty)
    pruned = apply_plan(make_plan(empty, state.managed(), ctx2), empty, ctx2, state, txn_id="t3", version=2,
                        commit="c2", run_checks=list)
    assert pruned.status == "applied", pruned
    for name in ("etc/new/deep/a.conf", "etc/new/deep/b.conf", "etc/new/c.conf", "etc/kept/d.conf"):
        assert not (root / name).exists(), name
    assert (root / "etc" / "kept" / "old.conf").read_bytes() == b"old\n"
