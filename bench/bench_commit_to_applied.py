"""Commit-to-applied time with the nudge, on loopback.

One device runs ``edge-agent run`` (a real subprocess, poll interval one hour, so only the nudge can
make it sync) against a real Mosquitto and a ``git daemon`` mirror. For each of N commits:

1. sign a new release (next version) and commit it (not timed: that is the operator's desk);
2. start the clock, ``git push`` to the mirror, publish the broadcast nudge as the fleet server does
   (``mosquitto_pub``, QoS 1);
3. stop the clock when the device's ``sync_succeeded`` event for that commit arrives over MQTT
   (``mosquitto_sub``, decoded with the shared schema).

Prints the median, 95th percentile and maximum of push-to-event and of nudge-to-event.
Goal: p50 <= 1 s, p95 <= 2 s.

Usage: ``python -m bench.bench_commit_to_applied [--commits 50]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from edge_agent.report import messages
from edge_agent.trust.keys import format_verify_key, generate_signing_key
from fleet_server.signing import sign_release
from tests.support.broker import Mosquitto, Subscriber, publish
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.mirror import GitDaemon

DEVICE = "bench-1"
PREFIX = "fleet/v1"
PROFILE = {"name": "bench-device", "allowed_roots": ["/etc"], "drivers": ["file", "directory"]}


def release_files(n: int) -> dict[str, str]:
    """A small release whose content changes with ``n``."""
    bundle = {"targets": [{"devices": [DEVICE]}], "resources": [
        {"kind": "file", "path": "/etc/bench/app.conf", "content": f"generation = {n}\n", "mode": "0644"},
    ]}
    return {"fleet.yaml": "description: bench fleet\n", "bundles/bench/bundle.yaml": yaml.safe_dump(bundle)}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def succeeded(sub: Subscriber, commit: str) -> bool:
    """True once ``sync_succeeded`` for ``commit`` arrived."""
    for r in sub.messages(f"{PREFIX}/{DEVICE}/events"):
        e = messages.decode("events", r.payload, topic_device=DEVICE)
        if e["type"] == "sync_succeeded" and e["commit"] == commit:
            return True
    return False


def main() -> int:
    """Run the benchmark and print the figures; exit 1 when a commit was never applied."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-c2a-") as tmp:
        base = Path(tmp)
        key = generate_signing_key(base / "op.key")
        work = WorkRepo.create(base / "work")
        (base / "mirrors").mkdir()
        bare = make_bare(base / "mirrors" / "fleet.git")
        version = 1
        work.write_files(release_files(0))
        sign_release(work.path, [key], expires=timedelta(days=1), now=datetime.now(UTC), version=version)
        first = work.commit("release 1")
        work.push(bare, force=True)
        (base / "profiles").mkdir()
        (base / "profiles" / "bench-device.yaml").write_text(yaml.safe_dump(PROFILE))
        (base / "root" / "etc").mkdir(parents=True)
        with GitDaemon(base / "mirrors") as mirror, Mosquitto(base / "mosquitto") as broker:
            config = {
                "device_id": DEVICE, "profile": "bench-device", "profile_dirs": ["profiles"],
                "repo": {"url": mirror.url("fleet.git"), "timeout": "5s"},
                "trust": {"keys": [format_verify_key(key.verify_key)]},
                "mqtt": {"host": "127.0.0.1", "port": broker.port},
                "intervals": {"poll": "1h", "drift": "1h", "health": "1h"},
                "root": "root", "state_dir": "state", "log_level": "warning",
            }
            (base / "agent.yaml").write_text(yaml.safe_dump(config))
            sub = Subscriber(broker.port, [f"{PREFIX}/{DEVICE}/events"], client_id="bench-watch")
            agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config",
                                      str(base / "agent.yaml")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            try:
                sub.wait_subscribed(1)
                if not sub.wait(lambda s: succeeded(s, first), 30):
                    print("the device never applied the first release", file=sys.stderr)
                    return 1
                time.sleep(0.5)  # let the agent subscribe to the nudge
                from_push: list[float] = []
                from_nudge: list[float] = []
                for n in range(1, args.commits + 1):
                    version += 1
                    work.write_files(release_files(n))
                    sign_release(work.path, [key], expires=timedelta(days=1), now=datetime.now(UTC),
                                 version=version)
                    sha = work.commit(f"release {version}")
                    start = time.monotonic()
                    work.push(bare, force=True)
                    nudged = time.monotonic()
                    nudge = messages.nudge_message(revision=sha, release=version, ts=datetime.now(UTC))
                    publish(broker.port, messages.nudge_topic(PREFIX), messages.encode(nudge))
                    if not sub.wait(lambda s, c=sha: succeeded(s, c), 10):
                        print(f"commit {n} ({sha}) was not applied within 10 s", file=sys.stderr)
                        return 1
                    done = time.monotonic()
                    from_push.append(done - start)
                    from_nudge.append(done - nudged)
            finally:
                if agent.poll() is None:
                    os.killpg(agent.pid, signal.SIGTERM)
                    try:
                        agent.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        os.killpg(agent.pid, signal.SIGKILL)
                        agent.wait(timeout=10)
                sub.stop()
    print(f"commit-to-applied over {len(from_push)} commits (edge-agent run, loopback, poll interval 1 h)")
    for name, values in (("push -> sync_succeeded", from_push), ("nudge -> sync_succeeded", from_nudge)):
        print(f"  {name:24s} p50 {statistics.median(values):.3f}s  p95 {percentile(values, 0.95):.3f}s"
              f"  max {max(values):.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
