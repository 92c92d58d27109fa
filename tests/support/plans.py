"""Desired states and resources built directly, for tests that call the planner without a release,
and the device state database those tests apply into (the ``state`` fixture)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.drivers.base import Context
from edge_agent.state import StateDB
from edge_core.release import DesiredState
from edge_core.resources import (
    File,
    Resource,
)

UNIT_TEXT = b"[Service]\nExecStart=/bin/true\n"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDB]:
    """A new device state database in the test's directory, closed after the test."""
    db = StateDB(tmp_path / "state.db")
    yield db
    db.close()


def desired_state(resources: Sequence[Resource], payloads: dict[str, bytes] | None = None,
                  checks: tuple = ()) -> DesiredState:
    """A DesiredState built directly (no release parsing)."""
    return DesiredState(bundles=("base",), resources=tuple(resources), checks=checks,
                        payloads=dict(payloads or {}))


def ctx_for(ctx: Context, desired: DesiredState) -> Context:
    return replace(ctx, payloads=desired.payloads)


def file_res(path: str, content: bytes, payloads: dict[str, bytes], *, mode: int | None = 0o644) -> File:
    res = File(id=f"file:{path}", bundle="base", path=path, mode=mode, content=content.decode())
    payloads[res.id] = content
    return res
