"""Crash safety: SIGKILL `edge-agent sync --once` at many instants of an apply of ~300 files.

After every kill each managed file must be wholly the old or wholly the new content (or still
absent, for a file the new release creates), and the next sync must undo the interrupted
transaction and converge to the new release exactly.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from edge_agent.agent import plan_only, status, sync_once
from edge_agent.config import AgentConfig, load_config
from tests.support.agent_fleet import AgentFleet, bundle, snapshot
from tests.support.mirror import GitDaemon

pytestmark = pytest.mark.slow

N_UPDATE = 200
N_CREATE = 100
KILL_POINTS = 50
SEED = 20240611
WORKERS = 2


def old_content(i: int) -> str:
    return f"old content of file {i}\n" + "o" * (i % 97)


def new_content(i: int) -> str:
    return f"NEW content of file {i}\n" + "n" * (i % 89)


def release_files(version: int) -> dict[str, str]:
    if version == 1:
        resources = [{"kind": "file", "path": f"/srv/data/f{i:03d}.conf", "source": f"files/f{i:03d}.conf"}
                     for i in range(N_UPDATE)]
        files = {f"bundles/bulk/files/f{i:03d}.conf": old_content(i) for i in range(N_UPDATE)}
    else:
        total = N_UPDATE + N_CREATE
        resources = [{"kind": "file", "path": f"/srv/data/f{i:03d}.conf", "source": f"files/f{i:03d}.conf"}
                     for i in range(total)]
        files = {f"bundles/bulk/files/f{i:03d}.conf": new_content(i) for i in range(total)}
    files["bundles/bulk/bundle.yaml"] = bundle(resources)
    return files


def run_agent(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "sync", "--once", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def apply_window(stderr: bytes, started: float) -> tuple[float, float]:
    """(seconds from spawn to the first applied change, to the commit) from the JSON log lines."""
    first = last = None
    for line in stderr.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        msg = str(rec.get("msg", ""))
        if "ts" not in rec:
            continue
        ts = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        if msg.startswith("apply ") and first is None:
            first = float(ts) - started
        if "committed" in msg:
            last = float(ts) - started
    assert first is not None, stderr[-2000:]
    assert last is not None, stderr[-2000:]
    return first, last


def check_old_or_new(root: Path) -> tuple[int, int]:
    """Assert every file is wholly old or new (or absent when created by the new release)."""
    data = root / "srv" / "data"
    olds = news = 0
    for i in range(N_UPDATE + N_CREATE):
        p = data / f"f{i:03d}.conf"
        if i >= N_UPDATE and not p.exists():
            olds += 1
            continue
        text = p.read_text()
        if i < N_UPDATE and text == old_content(i):
            olds += 1
        elif text == new_content(i):
            news += 1
        else:
            raise AssertionError(f"{p} is neither old nor new: {text[:60]!r}")
    return olds, news


@dataclass
class Device:
    """One copy of the device (root, state, config) that a worker kills and recovers over and over."""

    root: Path
    state_dir: Path
    config_path: Path
    config: AgentConfig


def clone_device(fleet: AgentFleet, base_root: Path, base_state: Path, where: Path) -> Device:
    where.mkdir()
    raw = yaml.safe_load(fleet.config_path.read_text())
    raw.update(root=str(where / "root"), state_dir=str(where / "state"),
               profile_dirs=[str(fleet.tmp / "profiles")])
    config_path = where / "agent.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    dev = Device(where / "root", where / "state", config_path, load_config(config_path))
    shutil.copytree(base_root, dev.root, symlinks=True)
    shutil.copytree(base_state, dev.state_dir, symlinks=True)
    return dev


def kill_and_recover(dev: Device, base_root: Path, base_state: Path, delays: list[float],
                     expected: dict[str, object], deadline: float) -> dict[str, int]:
    """For each delay: reset, start a sync, SIGKILL it, check old-or-new, converge; count where it hit."""
    kinds = {"mid": 0, "before": 0, "after": 0}
    for point, delay in enumerate(delays):
        assert time.monotonic() < deadline, f"crash test too slow at point {point}"
        shutil.rmtree(dev.root)
        shutil.rmtree(dev.state_dir)
        shutil.copytree(base_root, dev.root, symlinks=True)
        shutil.copytree(base_state, dev.state_dir, symlinks=True)
        proc = run_agent(dev.config_path)
        try:
            proc.wait(timeout=max(delay, 0.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()
        olds, news = check_old_or_new(dev.root)
        kinds["before" if news == 0 else "after" if olds == 0 else "mid"] += 1
        result = sync_once(dev.config)
        assert result.outcome in ("applied", "noop"), (point, delay, result)
        assert snapshot(dev.root) == expected, f"kill at {delay:.3f}s did not converge"
        info = status(dev.config)
        assert info["open_transaction"] is None
        assert info["installed"]["version"] == 2
    return kinds


def _worker(dev: Device, base_root: Path, base_state: Path, delays: list[float], expected: dict[str, object],
            deadline: float, out: Path) -> None:
    """One worker process: its share of the kill points; the counts or the error go to ``out``."""
    result: dict[str, object] = {}
    try:
        result["kinds"] = kill_and_recover(dev, base_root, base_state, delays, expected, deadline)
    except BaseException as exc:  # reported to the parent through the result file
        result["error"] = f"{type(exc).__name__}: {exc}"
    out.write_text(json.dumps(result))


def run_workers(devices: list[Device], base_root: Path, base_state: Path, delays: list[float],
                expected: dict[str, object], tmp_path: Path) -> list[dict[str, int]]:
    """Share the kill points between one forked process per device (each converging sync is CPU
    work, so processes, not threads); return each worker's counts, or fail with the first error."""
    ctx = multiprocessing.get_context("fork")
    deadline = time.monotonic() + 240
    procs, outs = [], []
    for w, dev in enumerate(devices):
        out = tmp_path / f"result-{w}.json"
        share = delays[w::len(devices)]
        proc = ctx.Process(target=_worker, args=(dev, base_root, base_state, share, expected, deadline, out))
        proc.start()
        procs.append(proc)
        outs.append(out)
    for proc in procs:
        proc.join(timeout=300)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    results = [json.loads(out.read_text()) if out.exists() else {"error": "worker died"} for out in outs]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors
    return [r["kinds"] for r in results]


def test_sigkill_during_apply_leaves_old_or_new_and_converges(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    with GitDaemon(mirrors) as daemon:
        fleet = AgentFleet(tmp_path, daemon, mirrors)
        fleet.publish(release_files(1))
        assert sync_once(fleet.config).outcome == "applied"
        fleet.publish(release_files(2))
        plan_only(fleet.config)  # fetch release 2 into the cache; nothing is applied
        base_root = tmp_path / "base-root"
        base_state = tmp_path / "base-state"
        shutil.copytree(fleet.root, base_root, symlinks=True)
        shutil.copytree(fleet.state_dir, base_state, symlinks=True)

        # Measure the apply window of an undisturbed run; its result is what every point converges to.
        started = time.time()
        proc = run_agent(fleet.config_path)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        window_start, window_end = apply_window(err, started)
        expected = snapshot(fleet.root)
        assert check_old_or_new(fleet.root) == (0, N_UPDATE + N_CREATE)

        # Spread the kill instants over the window (and a little around it), seeded.
        rng = random.Random(SEED)
        span = max(window_end - window_start, 0.05)
        delays = [window_start - 0.1 * span + rng.random() * 1.2 * span for _ in range(KILL_POINTS)]
        devices = [clone_device(fleet, base_root, base_state, tmp_path / f"device-{w}")
                   for w in range(WORKERS)]
        counts = run_workers(devices, base_root, base_state, delays, expected, tmp_path)
        kinds = {k: sum(c[k] for c in counts) for k in counts[0]}
        assert sum(kinds.values()) == KILL_POINTS
        # The seeded delays must actually land inside applies, not only around them.
        assert kinds["mid"] >= KILL_POINTS // 4, kinds
