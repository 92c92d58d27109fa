"""Flaky mirror: our TCP fault proxy in front of a real ``git daemon``, three real agent daemons.

While the mirror drops, resets, black-holes (half-open) and delays connections, every agent keeps
its last release untouched and retries after capped exponential backoff with full jitter. The
intervals each daemon drew (from its log line ``next attempt in ...``) and the gaps it actually
left between attempts (from its ``on_sync`` hook) are printed: they grow, stop at the cap, and are
spread. When the proxy heals, every agent converges on the new release within about one cap.
Then a truncated and a corrupted pack (the fault lands inside the pack data) are refused by a
one-shot sync that leaves the device root byte for byte as it was; the next clean fetch applies.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.agent import SyncResult, status, sync_once
from edge_agent.config import AgentConfig, load_config
from edge_agent.daemon import Daemon
from tests.support.agent_fleet import AgentFleet, bundle, snapshot
from tests.support.faultproxy import FaultProxy
from tests.support.mirror import GitDaemon
from tests.support.procs import spread
from tests.support.wait import wait_until

AGENTS = 3
BASE, CAP = 0.1, 1.6  # seconds: ceilings 0.1, 0.2, 0.4, 0.8, 1.6, 1.6, ...
TIMEOUT = 1.0
PHASES = (("drop", 3.0), ("reset", 3.0), ("blackhole", 3.0), ("delay", 3.0))
BLOB_SIZE, FAULT_AT = 200_000, 100_000


def release(version: int, blob: bytes | None = None) -> dict[str, str | bytes]:
    resources: list[dict[str, Any]] = [
        {"kind": "file", "path": "/etc/app/app.conf", "content": f"release = {version}\n"},
        {"kind": "symlink", "path": "/opt/app/current", "target": f"/opt/app/releases/{version}"},
    ]
    files: dict[str, str | bytes] = {}
    if blob is not None:
        resources.append({"kind": "file", "path": "/srv/blob.bin", "source": "files/blob.bin"})
        files["bundles/app/files/blob.bin"] = blob
    files["bundles/app/bundle.yaml"] = bundle(resources)
    return files


@dataclass
class Agent:
    """One agent daemon in a thread, recording when each sync ended and how it went."""

    config: AgentConfig
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, SyncResult]] = field(default_factory=list)
    thread: threading.Thread | None = None
    error: list[BaseException] = field(default_factory=list)

    def start(self) -> None:
        daemon = Daemon(self.config, stop=self.stop, rng=random.Random(self.seed),
                        on_sync=lambda r: self.results.append((time.monotonic(), r)))
        self.thread = threading.Thread(target=self._run, args=(daemon,),
                                       name=f"agent-{self.config.device_id}", daemon=True)
        self.thread.start()

    def _run(self, daemon: Daemon) -> None:
        try:
            daemon.run()
        except BaseException as exc:  # surfaced by halt()
            self.error.append(exc)

    def halt(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        assert not self.error, self.error


def agent_config(fleet: AgentFleet, n: int, url: str) -> AgentConfig:
    """Device ``n``'s config (own root and state), fetching through ``url``."""
    raw = yaml.safe_load(fleet.config_path.read_text())
    where = fleet.tmp / f"agent-{n}"
    for d in ("etc", "opt", "srv"):
        (where / "root" / d).mkdir(parents=True)
    raw.update(device_id=f"dev-{n}", root=str(where / "root"), state_dir=str(where / "state"),
               profile_dirs=[str(fleet.tmp / "profiles")],
               repo={"url": url, "timeout": f"{TIMEOUT}s"},
               backoff={"base": f"{int(BASE * 1000)}ms", "cap": f"{CAP}s"},
               intervals={"poll": "1h", "drift": "1h", "health": "1h"})
    path = where / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_agents_keep_their_release_back_off_with_jitter_and_converge(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.daemon")
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    with GitDaemon(mirrors) as daemon, FaultProxy("127.0.0.1", daemon.port, io_timeout=5.0) as proxy:
        fleet = AgentFleet(tmp_path, daemon, mirrors)
        url = f"git://127.0.0.1:{proxy.port}/fleet.git"
        fleet.publish(release(1))
        agents = [Agent(agent_config(fleet, n, url), seed=1000 + n) for n in range(AGENTS)]
        for a in agents:
            assert sync_once(a.config).outcome == "applied"
        kept = [snapshot(a.config.root) for a in agents]
        fleet.publish(release(2))

        proxy.drop()
        outage_start = time.monotonic()
        for a in agents:
            a.start()
        try:
            for kind, seconds in PHASES:
                if kind == "delay":
                    proxy.delay(TIMEOUT * 5)
                else:
                    getattr(proxy, kind)()
                time.sleep(seconds)
            for a, before in zip(agents, kept, strict=True):
                assert snapshot(a.config.root) == before, "a failing mirror changed the device"
                assert status(a.config)["installed"]["version"] == 1
                assert {r.outcome for _, r in a.results} == {"fetch_failed"}, a.results[-1]
            proxy.pass_through()
            healed = time.monotonic()
            wait_until(lambda: all(a.results and a.results[-1][1].outcome == "applied" for a in agents),
                       "every agent to apply release 2 after the mirror healed", CAP + 2 * TIMEOUT + 5)
            converged = [next(t for t, r in a.results if r.outcome == "applied") - healed for a in agents]
        finally:
            for a in agents:
                a.halt()
    for a in agents:
        assert (a.config.root / "etc/app/app.conf").read_text() == "release = 2\n"

    # The delays each daemon drew, from its log lines, and the gaps it really left between attempts.
    drawn: dict[str, list[float]] = {}
    for rec in caplog.records:
        if rec.getMessage().startswith("mirror unreachable; next attempt in"):
            drawn.setdefault(rec.threadName, []).append(float(rec.args[0]))  # type: ignore[index]
    lines = []
    for a in agents:
        name = a.thread.name if a.thread else ""
        delays = drawn[name]
        ends = [t for t, r in a.results if r.outcome == "fetch_failed"]
        gaps = [b - e for e, b in itertools.pairwise(ends)]
        assert len(delays) == len(ends) >= 10, (len(delays), len(ends))
        ceilings = [min(CAP, BASE * 2**n) for n in range(len(delays))]
        assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True)), list(zip(delays, ceilings))
        # A delay counts from the end of the failed attempt, so the gap between two attempts' ends is
        # the drawn delay plus the next attempt's own duration (at most a timeout).
        assert all(d - 0.15 <= g <= d + TIMEOUT + 1.0
                   for d, g in zip(delays, gaps, strict=False)), (delays, gaps)
        capped = delays[5:]
        stats = spread(capped)
        assert stats["cv"] > 0.15, f"{name}: capped delays are not spread: {capped}"
        assert sum(delays[:3]) / 3 < sum(capped) / len(capped), f"{name}: delays do not grow: {delays}"
        # Attempts that waited out the timeout (black hole, delay): the next one starts the drawn
        # delay after it ended.
        timed_out = [(d, g - TIMEOUT) for d, g, (_, r) in zip(delays, gaps, a.results[1:], strict=False)
                     if "no answer within" in (r.reason or "")]
        lines.append(f"{name}: (drawn, waited) before timed-out attempts "
                     + " ".join(f"({d:.2f}, {w:.2f})" for d, w in timed_out))
        lines.append(f"{name}: drawn " + " ".join(f"{d:.2f}" for d in delays))
        lines.append(f"{name}: gaps  " + " ".join(f"{g:.2f}" for g in gaps))
        lines.append(f"{name}: capped draws min {stats['min']:.2f} median {stats['median']:.2f} "
                     f"max {stats['max']:.2f} cv {stats['cv']:.2f}")
    firsts = [round(ends_t[0][0] - outage_start, 2) for ends_t in (a.results for a in agents)]
    print(f"\nflaky mirror: {AGENTS} agents, faults {[k for k, _ in PHASES]} for "
          f"{sum(s for _, s in PHASES):.0f}s, backoff base {BASE}s cap {CAP}s (ceilings "
          f"{[min(CAP, BASE * 2**n) for n in range(6)]}); first failures at {firsts}s; converged "
          f"{[round(c, 2) for c in converged]}s after the mirror healed; "
          f"proxy connections {proxy.connections}")
    print("\n".join(lines))
    assert max(converged) <= CAP + TIMEOUT + 1.0


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_a_damaged_pack_is_refused_without_touching_the_device(tmp_path: Path, fault: str) -> None:
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    with GitDaemon(mirrors) as daemon, FaultProxy("127.0.0.1", daemon.port) as proxy:
        fleet = AgentFleet(tmp_path, daemon, mirrors)
        config = agent_config(fleet, 0, f"git://127.0.0.1:{proxy.port}/fleet.git")
        fleet.publish(release(1, os.urandom(1000)))
        assert sync_once(config).outcome == "applied"
        before = snapshot(config.root)
        blob = os.urandom(BLOB_SIZE)
        fleet.publish(release(2, blob))
        if fault == "truncate":
            proxy.truncate_after(FAULT_AT)
        else:
            proxy.corrupt(FAULT_AT)
        result = sync_once(config)
        assert proxy.wait_idle(5.0)
        stream = proxy.server_streams[-1]
        print(f"\n{fault} at byte {FAULT_AT} of a {len(stream)}-byte server stream "
              f"(pack starts at {stream.find(b'PACK')}): {result.outcome}: {result.reason}")
        assert 0 <= stream.index(b"PACK") < FAULT_AT < len(stream) + (1 if fault == "truncate" else 0)
        assert result.outcome == "fetch_failed", result
        assert snapshot(config.root) == before
        assert status(config)["installed"]["version"] == 1
        proxy.pass_through()
        assert sync_once(config).outcome == "applied"
        assert (config.root / "srv/blob.bin").read_bytes() == blob
