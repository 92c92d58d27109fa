"""Commit-to-applied time through the whole path, on loopback.

Every part is real and separate: a ``git daemon`` serves the fleet's mirror (push enabled), a real
Mosquitto carries the nudges and reports, ``fleet-server`` watches the mirror (its own poll interval
one hour, so only the webhook can wake it), and one device runs ``edge-agent run`` (poll interval
one hour, so only the nudge can make it sync). The release is realistic: ``--bundles`` bundles of
``--files-per-bundle`` files each (40 files by default, each taken from a ``source:`` file), signed
with ``fleetctl release sign``. For each of N commits:

1. change one file of one bundle, sign a new release with ``fleetctl release sign`` and commit it
   (not timed: that is the operator's desk);
2. start the clock; ``git push`` to the mirror over ``git://``; POST a push payload to the fleet
   server's webhook (``POST /api/v1/hooks/git``, signed ``X-Hub-Signature-256`` with the
   ``git.webhook_secret_file`` secret), as a Git host would;
3. the server's Git watcher fetches, verifies and records the release and publishes the nudge; the
   device fetches, verifies and applies it and reports ``sync_succeeded``;
4. stop the clock when a ``mosquitto_sub`` watching the device's events topic receives that
   ``sync_succeeded`` for the pushed commit (it also timestamps the server's nudge, to split the
   total into stages).

Prints p50/p95/max of push-to-applied and of each stage (``--json``: one JSON object). Only
127.0.0.1 is used; every process this starts is stopped by its pid.

    python -m bench.bench_commit_to_applied [--commits 50] [--bundles 4] [--files-per-bundle 10] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.bench_apply import BIN, REPO, compile_like_the_package
from edge_core import messages
from tests.support.broker import Mosquitto
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.mirror import GitDaemon, free_port, wait_for_port

__all__ = ["main", "percentile", "run"]

DEVICE = "bench-1"
PREFIX = "fleet/v1"
WEBHOOK_SECRET = "bench-webhook-secret"
APPLY_TIMEOUT = 30.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def stats(values: list[float]) -> dict[str, float]:
    """p50, p95 and max of ``values`` (seconds)."""
    return {"p50": statistics.median(values), "p95": percentile(values, 0.95), "max": max(values)}


# --- the release -----------------------------------------------------------------------------------

def file_content(bundle: int, index: int, generation: int) -> str:
    """The content of one managed file at a generation: a config file of about 600 bytes."""
    lines = [f"# bundle {bundle}, file {index}", f"generation = {generation}"]
    lines += [f"option_{k} = value-{bundle}-{index}-{k}" for k in range(24)]
    return "\n".join(lines) + "\n"


def write_release(work: WorkRepo, bundles: int, per_bundle: int) -> None:
    """Write ``bundles`` bundles of ``per_bundle`` file resources each, generation 0."""
    work.write("fleet.yaml", "description: bench fleet\n")
    for b in range(bundles):
        resources = [{"kind": "file", "path": f"/opt/bench/b{b}/f{i:02d}.conf", "source": f"files/f{i:02d}.conf",
                      "mode": "0644"} for i in range(per_bundle)]
        work.write(f"bundles/b{b}/bundle.yaml",
                   yaml.safe_dump({"targets": [{"devices": [DEVICE]}], "resources": resources}))
        for i in range(per_bundle):
            work.write(f"bundles/b{b}/files/f{i:02d}.conf", file_content(b, i, 0))


def fleetctl(*args: str | Path) -> str:
    """Run ``fleetctl``; fail loudly; return its output."""
    proc = subprocess.run([str(BIN / "fleetctl"), *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"fleetctl {args[0]} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def git(*args: str, cwd: Path) -> str:
    """Run ``git``; fail loudly; return its output."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "bench", "GIT_COMMITTER_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@example.invalid", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"git {args[0]} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


# --- the watcher of the device's events and the server's nudges ------------------------------------

class TimedSubscriber:
    """``mosquitto_sub`` (QoS 1) on the given topics; keeps (arrival time, topic, payload) of each message."""

    def __init__(self, port: int, topics: list[str]) -> None:
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        argv = [*line_buffered, "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-q", "1",
                "-i", "bench-c2a-watch", "-d", "-F", "MSG\t%t\t%x"]
        for t in topics:
            argv += ["-t", t]
        self._cond = threading.Condition()
        self.received: list[tuple[float, str, bytes]] = []
        self.subscribed = 0
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            now = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                if line.startswith("MSG\t"):
                    _, topic, payload_hex = line.split("\t", 2)
                    self.received.append((now, topic, bytes.fromhex(payload_hex)))
                elif line.startswith("Subscribed (mid:"):
                    self.subscribed += 1
                self._cond.notify_all()

    def first(self, topic: str, match: Any, timeout: float) -> float | None:
        """Arrival time of the first message on ``topic`` whose payload satisfies ``match``, waiting (bounded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, t, payload in self.received:
                    if t == topic and match(payload):
                        return at
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._proc.poll() is not None:
                    return None
                self._cond.wait(min(remaining, 0.1))

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Wait until the broker answered the subscription.

        Raises:
            SystemExit: no answer in time.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.subscribed < 1:
                if time.monotonic() >= deadline:
                    raise SystemExit("mosquitto_sub was not subscribed in time")
                self._cond.wait(0.1)

    def stop(self) -> None:
        """Stop the client by pid."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._thread.join(timeout=5)


def sync_succeeded(commit: str) -> Any:
    """A payload matcher: the device's ``sync_succeeded`` event for ``commit``."""
    def match(payload: bytes) -> bool:
        e = messages.decode("events", payload, topic_device=DEVICE)
        return bool(e["type"] == "sync_succeeded" and e["commit"] == commit)
    return match


def nudge_for(commit: str) -> Any:
    """A payload matcher: the server's nudge naming ``commit``."""
    def match(payload: bytes) -> bool:
        try:
            return bool(json.loads(payload).get("revision") == commit)
        except ValueError:
            return False
    return match


# --- the processes -----------------------------------------------------------------------------------

@contextlib.contextmanager
def process(argv: list[str | Path], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own session, logging to ``log``, stopped by pid (SIGTERM, then SIGKILL)."""
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def post_webhook(port: int, before: str, after: str) -> None:
    """POST a push payload to the fleet server's webhook, signed as a Git host signs it.

    Raises:
        SystemExit: the server did not accept it.
    """
    body = json.dumps({"ref": "refs/heads/main", "before": before, "after": after,
                       "repository": {"name": "fleet"}}).encode()
    signature = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/hooks/git", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-GitHub-Event": "push",
                                              "X-Hub-Signature-256": signature})
    with urllib.request.urlopen(request, timeout=10) as resp:
        if resp.status != 202:
            raise SystemExit(f"the webhook answered {resp.status}")


def run(commits: int, bundles: int, per_bundle: int) -> dict[str, Any]:
    """Push ``commits`` signed releases through the whole path; return the timings (seconds)."""
    compile_like_the_package()
    n_files = bundles * per_bundle
    with tempfile.TemporaryDirectory(prefix="bench-c2a-") as tmp:
        base = Path(tmp)
        key = base / "operator.key"
        pub = fleetctl("keys", "generate", "--out", key).strip()
        secret = base / "webhook.secret"
        secret.write_text(WEBHOOK_SECRET + "\n")
        secret.chmod(0o600)
        work = WorkRepo.create(base / "work")
        make_bare(base / "mirrors" / "fleet.git")
        write_release(work, bundles, per_bundle)
        fleetctl("release", "sign", work.path, "--key", key, "--expires", "1d")
        head = work.commit("release 1")
        (base / "device" / "root").mkdir(parents=True)
        http_port = free_port()
        with GitDaemon(base / "mirrors") as mirror, Mosquitto(base / "mosquitto") as broker:
            url = mirror.url("fleet.git")
            git("push", "-q", url, "HEAD:refs/heads/main", cwd=work.path)
            server_cfg = {
                "mqtt": {"host": "127.0.0.1", "port": broker.port},
                "store": {"path": str(base / "fleet.db")},
                "http": {"host": "127.0.0.1", "port": http_port},
                "git": {"url": url, "branch": "main", "poll_interval": "1h", "cache_dir": str(base / "server-git"),
                        "webhook_secret_file": str(secret), "trust": {"keys": [pub], "threshold": 1}},
            }
            (base / "server.yaml").write_text(yaml.safe_dump(server_cfg))
            agent_cfg = {
                "device_id": DEVICE, "profile": "generic-linux", "profile_dirs": [str(REPO / "device_profiles")],
                "repo": {"url": url, "timeout": "5s"}, "trust": {"keys": [pub]},
                "mqtt": {"host": "127.0.0.1", "port": broker.port},
                "intervals": {"poll": "1h", "drift": "1h", "health": "1h"},
                "root": str(base / "device" / "root"), "state_dir": str(base / "device" / "state"),
                "log_level": "warning",
            }
            (base / "agent.yaml").write_text(yaml.safe_dump(agent_cfg))
            events = f"{PREFIX}/{DEVICE}/events"
            nudges = messages.nudge_topic(PREFIX)
            sub = TimedSubscriber(broker.port, [events, nudges])
            try:
                sub.wait_subscribed()
                with process([BIN / "fleet-server", "--config", base / "server.yaml"], base / "server.log") as srv, \
                        process([BIN / "edge-agent", "run", "--config", base / "agent.yaml"], base / "agent.log"):
                    wait_for_port(http_port, timeout=30, alive=lambda: srv.poll() is None)
                    post_webhook(http_port, "0" * 40, head)
                    if sub.first(events, sync_succeeded(head), 60) is None:
                        raise SystemExit("the device never applied the first release; logs in "
                                         f"{base}: {(base / 'agent.log').read_text()[-500:]}")
                    time.sleep(0.5)  # the first release's rollout bookkeeping settles
                    samples: dict[str, list[float]] = {k: [] for k in (
                        "push_to_applied", "push", "webhook_to_nudge", "nudge_to_applied")}
                    missing_nudges = 0
                    for n in range(1, commits + 1):
                        b, i = (n % n_files) // per_bundle, n % per_bundle
                        work.write(f"bundles/b{b}/files/f{i:02d}.conf", file_content(b, i, n))
                        fleetctl("release", "sign", work.path, "--key", key, "--expires", "1d")
                        before, head = head, work.commit(f"release {n + 1}")
                        t0 = time.monotonic()
                        git("push", "-q", url, "HEAD:refs/heads/main", cwd=work.path)
                        pushed = time.monotonic()
                        post_webhook(http_port, before, head)
                        applied = sub.first(events, sync_succeeded(head), APPLY_TIMEOUT)
                        if applied is None:
                            raise SystemExit(f"commit {n} ({head}) was not applied within {APPLY_TIMEOUT:.0f} s")
                        samples["push_to_applied"].append(applied - t0)
                        samples["push"].append(pushed - t0)
                        nudged = sub.first(nudges, nudge_for(head), 0)
                        if nudged is None:  # applied without a nudge seen: the stages cannot be split
                            missing_nudges += 1
                            continue
                        samples["webhook_to_nudge"].append(nudged - pushed)
                        samples["nudge_to_applied"].append(applied - nudged)
                    target = base / "device" / "root" / "opt" / "bench"
                    applied_files = sorted(target.rglob("*.conf"))
                    if len(applied_files) != n_files:
                        raise SystemExit(f"{len(applied_files)} files on the device, {n_files} wanted")
            finally:
                sub.stop()
    return {"commits": commits, "bundles": bundles, "files": n_files, "missing_nudges": missing_nudges,
            "stats": {k: stats(v) for k, v in samples.items() if v}, "samples": samples}


STAGES = (("push_to_applied", "git push -> sync_succeeded (whole path)"),
          ("push", "  git push to the git:// mirror"),
          ("webhook_to_nudge", "  webhook POST -> server's nudge (fetch, verify, record)"),
          ("nudge_to_applied", "  nudge -> sync_succeeded (device fetch, verify, apply)"))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (JSON with ``--json``); exit 1 when a commit was not applied."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument("--bundles", type=int, default=4)
    ap.add_argument("--files-per-bundle", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    try:
        result = run(args.commits, args.bundles, args.files_per_bundle)
    except SystemExit as exc:
        print(exc.code if isinstance(exc.code, str) else "benchmark failed", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"commit-to-applied over {result['commits']} commits: {result['files']} files in {result['bundles']} "
          "bundles, fleet-server webhook + Git watcher, edge-agent run (poll 1 h), loopback")
    for key, label in STAGES:
        s = result["stats"].get(key)
        if s is None:
            print(f"  {label:58s} not measured (no nudge seen)")
            continue
        print(f"  {label:58s} p50 {s['p50']:.3f}s  p95 {s['p95']:.3f}s  max {s['max']:.3f}s")
    if result["missing_nudges"]:
        print(f"  {result['missing_nudges']} commit(s) applied without a nudge seen: left out of the stages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
