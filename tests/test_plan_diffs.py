"""Only a plan that is shown carries content diffs (``Context.diffs``): a sync plans the same
changes without them, and without reading the current content of a file it replaces."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.drivers.base import get_driver
from edge_agent.engine.plan import make_plan
from edge_agent.fsafe import FsRoot
from tests.support.fake_system import make_context
from tests.support.plans import ctx_for, desired_state, file_res


@pytest.mark.parametrize("diffs", [True, False])
def test_the_same_plan_with_or_without_diffs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             diffs: bool) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "old.conf").write_bytes(b"one\n")
    p: dict[str, bytes] = {}
    desired = desired_state([file_res("/etc/old.conf", b"two\n", p), file_res("/etc/new.conf", b"new\n", p)],
                            p)
    ctx = replace(ctx_for(make_context(root, allowed_roots=("/etc",)), desired), diffs=diffs)
    reads: list[str] = []
    original = FsRoot.read_file

    def counting(self: FsRoot, path: str, **kwargs: int) -> bytes:
        reads.append(path)
        return original(self, path, **kwargs)

    monkeypatch.setattr(FsRoot, "read_file", counting)
    plan = make_plan(desired, {}, ctx)
    by_path = {c.data["path"]: c for c in plan.changes}
    assert {p: c.action for p, c in by_path.items()} == {"/etc/old.conf": "update", "/etc/new.conf": "create"}
    if diffs:
        assert "+two" in by_path["/etc/old.conf"].diff
        assert "-one" in by_path["/etc/old.conf"].diff
        assert "+new" in by_path["/etc/new.conf"].diff
        assert reads == ["/etc/old.conf"]
    else:
        assert [c.diff for c in plan.changes] == ["", ""]
        assert reads == []
    assert by_path["/etc/old.conf"].data["found"].startswith("sha256 ")  # drift reports keep their words
    for change in plan.changes:
        get_driver(change.kind).apply(change, ctx)
    assert (root / "etc" / "old.conf").read_bytes() == b"two\n"
    assert (root / "etc" / "new.conf").read_bytes() == b"new\n"
