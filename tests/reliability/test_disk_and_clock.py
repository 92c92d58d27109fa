"""Full disk and clock skew.

Full disk: the device's state directory (journal, backups, SQLite state, Git cache) is a real 4 MiB
tmpfs mounted for the test (the tests run as root here; without the right to mount the case is
skipped, see docs/reliability.md). Release 1 has a 1 MiB file; the tmpfs is then filled so that
the compressed Git fetch of release 2 still fits but a backup of the old 1 MiB content does not.
The apply must end without touching the device (refused or rolled back, the root byte-identical,
release 1 still installed), and once space is back the next sync converges.

Clock skew: the agent runs with its clock a year ahead (the release has expired: refused, the
device keeps what it has and reports the refusal) and a year behind (the release looks created in
the future; the verifier has no not-before check, so it applies while expiry is still judged on
the device's clock; see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.agent import check_drift, status, sync_once
from tests.support.agent_fleet import AgentFleet, bundle, snapshot

pytestmark = pytest.mark.timeout(120)

BIG = 1024 * 1024


def release(fill: str, motd: str) -> dict[str, str | bytes]:
    return {
        "fleet.yaml": "description: disk and clock\n",
        "bundles/app/bundle.yaml": bundle([
            {"kind": "file", "path": "/opt/data.bin", "source": "files/data.bin", "mode": "0644"},
            {"kind": "file", "path": "/etc/motd", "content": motd, "mode": "0644"},
        ]),
        "bundles/app/files/data.bin": fill * BIG,
    }


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``where`` (skip when mounting is not allowed); unmount after."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10, check=False)


def fill_until(fs: Path, leave: int) -> Path:
    """Write a filler file on ``fs`` until only about ``leave`` bytes are free; return its path."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def free_bytes(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def test_full_state_filesystem_rolls_back_and_recovers(fleet: AgentFleet) -> None:
    with tmpfs(fleet.state_dir, "4m"):
        fleet.publish(release("A", "one\n"))
        first = sync_once(fleet.config)
        assert first.outcome == "applied", first
        before = snapshot(fleet.root)
        fleet.publish(release("B", "two\n"))
        filler = fill_until(fleet.state_dir, 256 * 1024)
        left = free_bytes(fleet.state_dir)
        assert left < BIG // 2
        result = sync_once(fleet.config)
        outcome, reason = result.outcome, result.reason or ""
        print(f"\nfull disk: {left} bytes free on the state tmpfs; sync ended {outcome}: {reason[:200]}")
        assert outcome == "rolled_back", result
        assert "no space left" in reason.lower()
        assert status(fleet.config)["installed"]["version"] == 1
        assert snapshot(fleet.root) == before, "the device changed under a full state filesystem"
        filler.unlink()
        again = sync_once(fleet.config)
        assert again.outcome == "applied", again
        assert (fleet.root / "opt/data.bin").read_bytes() == b"B" * BIG
        assert (fleet.root / "etc/motd").read_text() == "two\n"
        info = status(fleet.config)
        assert info["installed"]["version"] == 2
        assert info["open_transaction"] is None
        assert not list(fleet.root.rglob(".ef-tmp-*"))
    assert not os.path.ismount(fleet.state_dir)


def test_a_clock_a_year_ahead_refuses_as_expired_and_keeps_the_device(fleet: AgentFleet) -> None:
    fleet.publish(release("A", "one\n"), expires=timedelta(days=30))
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    fleet.publish(release("A", "two\n"), expires=timedelta(days=30))
    ahead = datetime.now(UTC) + timedelta(days=365)
    result = sync_once(fleet.config, now=ahead)
    print(f"\nclock +1 year: {result.outcome}: {result.reason}")
    assert result.outcome == "refused", result
    assert "expire" in (result.reason or "").lower()
    assert snapshot(fleet.root) == before
    assert status(fleet.config)["installed"]["version"] == 1
    refused = [p for t, p in fleet.outbox() if t.endswith("/events") and b'"type":"sync_refused"' in p]
    assert refused
    assert b"expired" in refused[-1]
    # The drift loop still enforces the release the device has, whatever the clock says.
    (fleet.root / "etc/motd").write_text("tampered\n")
    assert check_drift(fleet.config, now=ahead).corrected
    assert (fleet.root / "etc/motd").read_text() == "one\n"
    # With the clock right again the release applies.
    assert sync_once(fleet.config).outcome == "applied"
    assert (fleet.root / "etc/motd").read_text() == "two\n"


def test_a_clock_a_year_behind_applies_a_release_created_in_its_future(fleet: AgentFleet) -> None:
    sha = fleet.publish(release("A", "one\n"), expires=timedelta(days=30))
    behind = datetime.now(UTC) - timedelta(days=365)
    result = sync_once(fleet.config, now=behind)
    print(f"\nclock -1 year: {result.outcome} {result.reason}")
    assert result.outcome == "applied", result
    assert result.commit == sha
    assert (fleet.root / "etc/motd").read_text() == "one\n"
    # Expiry is still enforced on the device's clock: a release that expired before its (wrong)
    # "now" is refused, one valid a year back is not.
    fleet.publish(release("A", "two\n"), expires=timedelta(days=1),
                  now=datetime.now(UTC) - timedelta(days=400))
    late = sync_once(fleet.config, now=behind)
    assert late.outcome == "refused", late
    assert "expire" in (late.reason or "").lower()
    assert (fleet.root / "etc/motd").read_text() == "one\n"
