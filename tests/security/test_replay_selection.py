"""The selection rule and the monotonic check as a table: what a sync follows, and which sources
may install a release older than the installed one."""

from __future__ import annotations

import pytest

from edge_agent.selection import Baseline, Target, check_monotonic, choose
from edge_agent.state import Installed
from edge_core.errors import RollbackError

A, B, C = "a" * 40, "b" * 40, "c" * 40
ON_2 = Installed(version=2, commit=C, applied_at=0.0, bundles=())


@pytest.mark.parametrize(("want", "assigned", "baseline", "installed", "expected"), [
    (A, B, Baseline(C, 3), ON_2, Target(A, "local")),
    (None, B, Baseline(A, 3), ON_2, Target(B, "assigned")),
    (None, None, Baseline(A, 3), ON_2, Target(A, "baseline")),
    (None, None, Baseline(A, 2), ON_2, Target(A, "baseline")),
    (None, None, Baseline(A, 1), ON_2, Target(C, "baseline")),   # an older baseline: stay put
    (None, None, Baseline(A, 1), None, Target(A, "baseline")),
    (None, None, None, ON_2, Target(None, "head")),
])
def test_what_a_sync_follows(want: str | None, assigned: str | None, baseline: Baseline | None,
                             installed: Installed | None, expected: Target) -> None:
    assert choose(want=want, assigned=assigned, baseline=baseline, installed=installed) == expected


@pytest.mark.parametrize("source", ["head", "baseline"])
def test_only_an_instruction_goes_back(source: str) -> None:
    with pytest.raises(RollbackError, match="release 1 is older than the installed release 2"):
        check_monotonic(Target(A, source), 1, ON_2)
    check_monotonic(Target(A, source), 2, ON_2)
    check_monotonic(Target(A, source), 3, ON_2)
    check_monotonic(Target(A, source), 1, None)
    for instructed in ("assigned", "local"):
        check_monotonic(Target(A, instructed), 1, ON_2)
