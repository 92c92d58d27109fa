"""Rollout of a simulated fleet through a real broker and a real ``fleet-server`` process.

    .venv/bin/python -m bench.bench_rollout [--devices 10000 | --sizes 10000,30000,100000] [--waves 4]
                                            [--timeout 600] [--publishers 2] [--heartbeat 60]
                                            [--store sqlite|postgresql] [--replicas 1]

Per fleet size: a real Mosquitto on a free loopback port (anonymous, no ACLs), a real
``fleet-server`` process (``python -m fleet_server.main``, embedded SQLite, 127.0.0.1 only; with
``--store postgresql`` a PostgreSQL cluster started for the run with its durable defaults, and
``--replicas`` servers on it that split the reports through an MQTT share group) and
the simulated devices of :mod:`bench.load_fleet` in ``--publishers`` child processes, one MQTT
connection each publishing for its slice of the device ids. The devices register (``online`` and a
first ``status``), heartbeat every ``--heartbeat`` seconds (``status`` and ``health`` in turn: about
1,700 messages/s at 100,000 devices), and answer each assignment after 1-5 s (seeded) with
``sync_succeeded``, or ``sync_failed`` for 0.5 % of them (so the wave gates, max 5 % failures once 50
devices of the wave reported, are exercised and pass). The benchmark starts a 4-wave rollout (1 %, 10 %, 50 %, 100 %, zero soak)
through ``POST /api/v1/rollouts`` and, once a second while it runs, times the first page of
``GET /api/v1/devices``, the dashboard's ``GET /api/v1/summary`` and ``GET /api/v1/rollouts/{id}``
(what ``fleetctl rollout status`` reads), reads the ingest backlog age from ``/healthz`` and the
server's RSS from ``/proc``.

Figures, each printed beside its goal: registration time, rollout wall time from start to
succeeded (``not finished in T s`` after ``--timeout``), lost reports (published and acknowledged
by the broker, minus committed by the server, per kind, after the fleet stops and the server
drains), ingest lag (max and p95 of the backlog age), p95 latency of the three calls, server peak
RSS, server CPU seconds per device, and how many full garbage collections the server process ran
(``python_gc_collections_total``: each stops all its threads). The JSON on stdout feeds ``bench/run_all.py``.

:class:`SimFleet` (one paho client, one object per device, used by the tests) stays here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_fleet import FleetOptions, fleet_process
from bench.rollout_probe import DeliveryProbe, Sampler, ServerProcess, p95, scrape
from edge_core import messages as m
from edge_core.preflight_messages import plan_message
from fleet_server.config import StoreConfig
from fleet_server.store import open_store

__all__ = ["GOALS", "SimFleet", "main", "run"]

PREFIX = "fleet/v1"

Outcome = Callable[[str, int], str]
"""``outcome(device, release) -> "applied" | "failed" | "rolled_back" | "refused"``."""
PreflightAnswer = Callable[[str, int], tuple[str, str | None]]
"""``answer(device, release) -> (outcome, reason)``: a device's preflight verdict (``change``,
``nochange`` or ``refused``)."""
_EVENT = {"applied": "sync_succeeded", "failed": "sync_failed", "rolled_back": "sync_rolled_back",
          "refused": "sync_refused"}


class SimFleet:
    """Many simulated devices behind ONE paho client (the broker must run without ACLs).

    Each device starts on ``initial`` (release, commit), reports ``online`` and ``status``, and
    answers each ``desired`` message with the outcome ``outcome(device, release)`` gives: an event
    (``sync_succeeded`` etc.) and a new ``status``. A device set offline publishes ``online=false``
    and ignores assignments until it is set online again, when it handles the latest one it got.

    Args:
        port: the broker's port on 127.0.0.1.
        devices: device id -> labels.
        initial: (release, commit) every device runs at first.
        outcome: decides how a sync to a release ends on a device (default: always applied).
        client_id: the MQTT client id.
    """

    def __init__(self, port: int, devices: Mapping[str, Mapping[str, str]], *, initial: tuple[int, str],
                 outcome: Outcome | None = None, client_id: str = "sim-fleet",
                 preflight: PreflightAnswer | None = None) -> None:
        self.port = port
        self.labels = {d: dict(v) for d, v in devices.items()}
        self.running: dict[str, tuple[int, str]] = dict.fromkeys(devices, initial)
        self.outcome: Outcome = outcome or (lambda _d, _r: "applied")
        self.preflight: PreflightAnswer = preflight or (lambda _d, _r: ("change", None))
        self.preflights: dict[str, list[str]] = {d: [] for d in devices}
        self.offline: set[str] = set()
        self.paused: set[str] = set()
        self.pending: dict[str, tuple[int, str]] = {}
        self.received: dict[str, list[int]] = {d: [] for d in devices}
        self._lock = threading.Lock()
        self._seq = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *_a: self._subscribed.set()

    def _ts(self) -> float:
        with self._lock:
            self._seq += 1
            return time.time() + self._seq * 1e-6

    def _send(self, device: str, kind: str, msg: dict[str, Any], *, retain: bool = False) -> None:
        self._client.publish(m.topic(PREFIX, device, kind), m.encode(msg), qos=1, retain=retain)

    def _status(self, device: str) -> None:
        release, commit = self.running[device]
        msg = m.status_message(device, commit=commit, release=release, sync_state="in_sync", drift={},
                               paused=device in self.paused, ts=self._ts())
        self._send(device, "status", msg, retain=True)

    def start(self, timeout: float = 10.0) -> None:
        """Connect, report every device online with its status, subscribe to every ``desired``.

        Raises:
            TimeoutError: the subscription was not acknowledged within ``timeout``.
        """
        self._client.connect("127.0.0.1", self.port)
        self._client.loop_start()
        for device in self.running:
            self._send(device, "online", m.online_message(device, True, self._ts()), retain=True)
            self._status(device)
        self._client.subscribe([(f"{PREFIX}/+/desired", 1), (f"{PREFIX}/+/preflight", 1)])
        if not self._subscribed.wait(timeout):
            raise TimeoutError("the broker did not acknowledge the subscription")

    def stop(self) -> None:
        """Disconnect (the devices' retained online messages stay as they are)."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = m.parse_topic(PREFIX, msg.topic)
        if parsed is None or parsed[0] is None or parsed[0] not in self.running:
            return
        device = parsed[0]
        if parsed[1] == "preflight":
            self._answer_preflight(device, bytes(msg.payload))
            return
        desired = m.decode("desired", bytes(msg.payload), topic_device=device)
        with self._lock:
            self.received[device].append(int(desired["release"]))
            self.pending[device] = (int(desired["release"]), str(desired["revision"]))
            if device in self.offline or device in self.paused:
                return
        self._apply(device)

    def _answer_preflight(self, device: str, payload: bytes) -> None:
        request = m.decode("preflight", payload, topic_device=device)
        with self._lock:
            self.preflights[device].append(str(request["rollout_id"]))
            if device in self.offline:
                return
        outcome, reason = self.preflight(device, int(request["release"]))
        plan = plan_message(device, commit=str(request["revision"]), release=int(request["release"]),
                            rollout_id=str(request["rollout_id"]), outcome=outcome,
                            changes={"file": 1} if outcome == "change" else {}, prune=0, drift=0,
                            reason=reason, ts=self._ts())
        self._send(device, "plan", plan)

    def _apply(self, device: str) -> None:
        with self._lock:
            want = self.pending.pop(device, None)
        if want is None or want == self.running[device]:
            if want is not None:
                self._event(device, "applied", want)
            return
        outcome = self.outcome(device, want[0])
        if outcome == "applied":
            self.running[device] = want
        self._event(device, outcome, want)
        self._status(device)

    def _event(self, device: str, outcome: str, concerns: tuple[int, str]) -> None:
        msg = m.event_message(device, type=_EVENT[outcome], commit=concerns[1], release=concerns[0], ts=self._ts(),
                              reason=None if outcome == "applied" else f"simulated {outcome}")
        self._send(device, "events", msg)

    def set_online(self, device: str, online: bool) -> None:
        """Take a device off the broker (``online=false``, assignments ignored) or bring it back."""
        with self._lock:
            (self.offline.discard if online else self.offline.add)(device)
        self._send(device, "online", m.online_message(device, online, self._ts()), retain=True)
        if online:
            self._status(device)
            self._apply(device)

    def set_paused(self, device: str, paused: bool) -> None:
        """Hold (update lock) or release a device: paused devices defer assignments and say so."""
        with self._lock:
            (self.paused.discard if not paused else self.paused.add)(device)
        release, commit = self.running[device]
        self._send(device, "events", m.event_message(device, type="paused" if paused else "resumed",
                                                     commit=commit, release=release, ts=self._ts(),
                                                     reason="update lock"))
        self._status(device)
        if not paused:
            self._apply(device)


GOALS = {"wall_seconds": 300.0, "lost": 0, "lag_seconds": 5.0, "p95_ms": 100.0, "rss_mib": 500.0}
"""The targets each figure is printed beside (wall time: the goal at 100,000 devices)."""
_KINDS = ("online", "status", "health", "events")
_FINAL = ("succeeded", "halted", "rolled_back", "aborted", "superseded")


def _log(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {text}\n")
    sys.stderr.flush()


def _plan(waves: int) -> dict[str, Any]:
    percents = [1.0, 10.0, 50.0, 100.0] if waves == 4 else [round(100 * (i + 1) / waves, 2) for i in range(waves)]
    # the failure rate is judged once 50 devices of a wave reported: judged from the first report on, one
    # of the 0.5 % simulated failures among a wave's first 20 reports halts the rollout by chance
    return {"name": "bench", "waves": [{"name": f"wave-{i + 1}", "percent": p, "soak": 0, "timeout": 1800,
                                        "max_failure_rate": 0.05, "min_reported": 50}
                                       for i, p in enumerate(percents)]}


def _fleet_ids(count: int) -> dict[str, dict[str, str]]:
    canaries = max(10, count // 1000)
    return {f"dev-{i:06d}": ({"canary": "true"} if i < canaries else {}) for i in range(count)}


def _receive_lag(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """The device-to-receipt delay from the ``fleet_ingest_lag_seconds`` histogram (the devices run
    on this machine's clock): the upper bound of the bucket holding the 95th percentile, and the
    share of messages received more than 5 s after they were sent."""
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in metrics.items()
                     if k.startswith("fleet_ingest_lag_seconds_bucket"))
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return {"p95_le_seconds": None, "over_5s_share": None}
    p95_le = next(le for le, count in buckets if count >= 0.95 * total)
    within_5 = max((count for le, count in buckets if le <= 5.0), default=0.0)
    return {"p95_le_seconds": p95_le, "over_5s_share": round(1 - within_5 / total, 4)}


def _stored_counters(store: StoreConfig) -> dict[str, int]:
    """The server's persistent ingest counters (``ingested.<kind>``, ``dropped.<reason>``), read from
    its database by a second connection (SQLite: read-only, WAL: no lock on the server's writers)."""
    if store.backend == "sqlite":
        conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=30.0)
        try:
            return {str(n): int(v) for n, v in conn.execute("SELECT name, value FROM counters")}
        finally:
            conn.close()
    reader = open_store(store)
    try:
        return reader.counters()
    finally:
        reader.close()


def _drain(server: ServerProcess, sent_total: int, timeout: float) -> dict[str, int]:
    """Wait (bounded) until the server committed as much as was sent, or made no progress for 10 s;
    return its counters."""
    deadline = time.monotonic() + timeout
    last, still = -1, 0
    counters = _stored_counters(server.store)
    while time.monotonic() < deadline:
        done = sum(v for k, v in counters.items() if k.startswith(("ingested.", "dropped.")))
        if done >= sent_total:
            break
        still = still + 1 if done == last else 0
        if still >= 10:
            break
        last = done
        time.sleep(1.0)
        counters = _stored_counters(server.store)
    return counters


def _scrape_or_empty(server: ServerProcess) -> dict[str, float]:
    try:
        return scrape(server.url, server.token)
    except (httpx.HTTPError, ValueError) as exc:
        _log(f"/metrics unavailable at the end of the run: {exc}")
        return {}


class _Fleet:
    """The simulated fleet: ``publishers`` child processes (see :mod:`bench.load_fleet`)."""

    def __init__(self, port: int, count: int, publishers: int, options: FleetOptions) -> None:
        ids = _fleet_ids(count)
        names = list(ids)
        ctx = mp.get_context("spawn")
        self.pipes: list[Any] = []
        self.children: list[Any] = []
        for k in range(publishers):
            part = {d: ids[d] for d in names[k::publishers]}
            parent, child = ctx.Pipe()
            opts = FleetOptions(options.initial, options.heartbeat, options.answer_delay, options.failure_rate,
                                options.seed + k)
            proc = ctx.Process(target=fleet_process, args=(port, part, opts, f"bench-fleet-{k}", child),
                               daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.children.append(proc)

    def _collect(self, what: str, timeout: float) -> list[dict[str, Any]]:
        answers = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a simulated-fleet process did not answer {what!r} within {timeout:g}s")
            tag, body = pipe.recv()
            assert tag == what
            answers.append(body)
        return answers

    def registered(self, timeout: float) -> list[dict[str, Any]]:
        """Wait until every child published and got acknowledged its registration messages."""
        return self._collect("registered", timeout)

    def beat(self) -> None:
        """Start the heartbeats."""
        for pipe in self.pipes:
            pipe.send("beat")

    def stop(self, timeout: float = 90.0) -> dict[str, Any]:
        """Stop every child; return the summed counts of what was sent and answered."""
        for pipe in self.pipes:
            pipe.send("stop")
        answers = self._collect("stopped", timeout)
        sent = {k: sum(a["sent"].get(k, 0) for a in answers) for k in _KINDS}
        answered = {k: sum(a["answered"].get(k, 0) for a in answers) for k in ("applied", "failed")}
        return {"sent": sent, "answered": answered, "acked": all(a["acked"] for a in answers)}

    def kill(self) -> None:
        """Stop the children by pid (bounded)."""
        for proc in self.children:
            proc.join(5.0)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5.0)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def run(devices: int, *, waves: int = 4, timeout: float = 600.0, publishers: int = 2, heartbeat: float = 60.0,
        seed: int = 1, ingest_processes: int | None = None, store: str = "sqlite",
        replicas: int = 1) -> dict[str, Any]:
    """Run the benchmark for one fleet size and return its figures (see the module docstring).
    ``store`` is ``sqlite`` (one server) or ``postgresql`` (``replicas`` servers sharing it)."""
    from tests.support.broker import Mosquitto
    from tests.support.mirror import free_port
    from tests.support.postgres import Postgres

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    old, new = (1, "1" * 40), (2, "2" * 40)
    out: dict[str, Any] = {"devices": devices, "waves": waves, "timeout": timeout, "publishers": publishers,
                           "heartbeat": heartbeat, "ingest_processes": ingest_processes, "finished": False,
                           "store": store, "replicas": replicas, "phase": "not started"}
    fleet: _Fleet | None = None
    probe: DeliveryProbe | None = None
    pg: Postgres | None = None
    servers: list[ServerProcess] = []
    try:
        if store == "postgresql":
            pg = Postgres(durable=True).start()
            config = StoreConfig(url=pg.create_database(), password_file=pg.password_file)
        else:
            config = StoreConfig(path=work / "fleet.db")
        with Mosquitto(work / "broker", extra_lines=["max_inflight_messages 1000", "max_queued_messages 10000000",
                                                     "autosave_interval 600"]) as broker:
            servers = [ServerProcess(work, broker.port, free_port(), ingest_processes, store=config,
                                     name=f"bench-server-{i}" if replicas > 1 else "bench-server",
                                     share_group="bench" if replicas > 1 else None) for i in range(replicas)]
            recorder = open_store(config)  # the releases the Git watcher would have recorded
            for version, commit in (old, new):
                recorder.record_release(version, commit, ["bench"], time.time())
            recorder.close()
            for server in servers:
                server.start()
            server = _leader(servers, 60.0)
            others = [s for s in servers if s is not server]
            cpu_start = sum(s.cpu_seconds() for s in servers)
            t_reg = time.monotonic()
            fleet = _Fleet(broker.port, devices, publishers,
                           FleetOptions(initial=old, heartbeat=heartbeat, seed=seed))
            fleet.registered(max(120.0, devices / 200))
            http = httpx.Client(base_url=server.url, timeout=30.0,
                                headers={"Authorization": f"Bearer {server.token}"})
            reg_deadline = time.monotonic() + max(120.0, devices / 200)
            known = 0
            while time.monotonic() < reg_deadline:
                known = int(http.get("/api/v1/devices", params={"limit": 1}).json()["total"])
                if known >= devices:
                    break
                time.sleep(0.5)
            out["registration_seconds"] = round(time.monotonic() - t_reg, 1) if known >= devices else None
            out["registered"] = known
            _log(f"{devices} devices: {known} registered in {time.monotonic() - t_reg:.1f} s")
            if known < devices:
                out["phase"] = f"registration not finished in {reg_deadline - t_reg:.0f} s"
                return out
            probe = DeliveryProbe(broker.port, list(_fleet_ids(devices))[::max(1, devices // 50)], PREFIX)
            fleet.beat()
            cpu0, t0 = sum(s.cpu_seconds() for s in servers), time.monotonic()
            answer = http.post("/api/v1/rollouts", json={"release": new[0], "plan": _plan(waves), "reason": "bench"},
                               headers={"X-Actor": "bench"})
            if answer.status_code != 201:
                out["phase"] = f"start refused: {answer.status_code} {answer.text[:200]}"
                return out
            rid = str(answer.json()["id"])
            sampler = Sampler(server, rid, others)
            sampler.start()
            last_log = 0.0
            while time.monotonic() - t0 < timeout and sampler.phase not in _FINAL:
                time.sleep(0.5)
                if time.monotonic() - last_log >= 30:
                    last_log = time.monotonic()
                    progress = [w.get("progress", {}).get("done") for w in sampler.detail.get("waves", [])]
                    _log(f"{devices} devices: {sampler.phase} after {time.monotonic() - t0:.0f} s, done per wave "
                         f"{progress}, lag {sampler.lag[-1] if sampler.lag else None}")
            wall = time.monotonic() - t0
            sampler.stop()
            out["phase"] = sampler.phase
            out["finished"] = sampler.phase == "succeeded"
            out["wall_seconds"] = round(wall, 1)
            out["rollout_cpu_seconds"] = round(sum(s.cpu_seconds() for s in servers) - cpu0, 1)
            counts = fleet.stop()
            sent_total = sum(counts["sent"].values())
            counters = _drain(server, sent_total, 120.0)
            stored = {k: counters.get(f"ingested.{k}", 0) for k in _KINDS}
            dropped = sum(v for k, v in counters.items() if k.startswith("dropped."))
            metrics = _scrape_or_empty(server)
            cpu = sum(s.cpu_seconds() for s in servers) - cpu_start
            # with replicas, the sum of each one's peak (the peaks need not coincide: an upper bound)
            rss_peak = sum(s.rss_peak_mib() for s in servers)
            out.update({
                "sent": counts["sent"], "stored": stored, "dropped": dropped, "broker_acked_all": counts["acked"],
                "lost": sent_total - sum(stored.values()), "answered": counts["answered"],
                "lag_max_seconds": round(max(sampler.lag), 2) if sampler.lag else None,
                "lag_p95_seconds": round(p95(sampler.lag) or 0.0, 2) if sampler.lag else None,
                "commit_delay_seconds": metrics.get("fleet_ingest_commit_delay_seconds"),
                "receive_lag": _receive_lag(metrics),
                "gc_full_collections": metrics.get("python_gc_collections_total{generation=2}"),
                "probe_delivery": probe.figures(),
                "p95_ms": {k: _ms(p95(v)) for k, v in sampler.latency.items()},
                "max_ms": {k: _ms(max(v)) if v else None for k, v in sampler.latency.items()},
                "samples": len(sampler.latency["devices"]), "call_errors": sampler.errors,
                "rss_max_mib": round(max([rss_peak, *sampler.rss]), 1),
                "rss_main_max_mib": round(sum(s.rss_peak_mib(main_only=True) for s in servers), 1),
                "server_pids": sum(len(s.pids()) for s in servers),
                "server_cpu_seconds": round(cpu, 1), "cpu_ms_per_device": round(1000 * cpu / devices, 2),
                "waves_done": [w.get("progress", {}).get("done") for w in sampler.detail.get("waves", [])],
            })
            http.close()
    finally:
        if probe is not None:
            probe.stop()
        if fleet is not None:
            fleet.kill()
        for s in servers:
            s.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def _leader(servers: list[ServerProcess], timeout: float) -> ServerProcess:
    """The server whose ``/healthz`` says it leads (bounded wait).

    Raises:
        RuntimeError: none did within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in servers:
            if s.role() == "leader":
                return s
        time.sleep(0.2)
    raise RuntimeError(f"no fleet-server took the leadership within {timeout:g}s")


def _goal_lines(r: Mapping[str, Any]) -> list[str]:
    g = GOALS

    def line(name: str, value: object, goal: str) -> str:
        return f"  {name:<24}{value!s:<30}{goal}"

    wall = f"{r['wall_seconds']:.1f} s" if r.get("finished") else f"not finished in {r['timeout']:.0f} s ({r['phase']})"
    lines = [f"== {r['devices']:,} devices, {r['waves']} waves",
             line("registration", f"{r.get('registration_seconds')} s", ""),
             line("rollout wall time", wall, f"goal <= {g['wall_seconds']:.0f} s at 100,000")]
    if "lost" not in r:
        return lines
    p = r["p95_ms"]
    lines += [
        line("lost reports", r["lost"], f"goal {g['lost']} (sent {sum(r['sent'].values())}, "
             f"stored {sum(r['stored'].values())}, dropped {r['dropped']})"),
        line("ingest lag max / p95", f"{r['lag_max_seconds']} / {r['lag_p95_seconds']} s",
             f"goal < {g['lag_seconds']:.0f} s (received, not committed)"),
        line("send-to-receipt p95 <=", f"{r['receive_lag']['p95_le_seconds']} s",
             f"{r['receive_lag']['over_5s_share']} of messages over 5 s (device ts to the server's receipt)"),
        line("send-to-probe p95", f"{r['probe_delivery']['p95_seconds']} s",
             f"{r['probe_delivery']['over_5s_share']} over 5 s (device ts to an idle subscriber, "
             f"{r['probe_delivery']['reports']} reports of {r['probe_delivery']['devices']} devices)"),
        line("p95 GET /api/v1/devices", f"{p['devices']} ms", f"goal <= {g['p95_ms']:.0f} ms"),
        line("p95 GET /api/v1/summary", f"{p['summary']} ms", f"goal <= {g['p95_ms']:.0f} ms"),
        line("p95 rollout status", f"{p['rollout']} ms", f"goal <= {g['p95_ms']:.0f} ms"),
        line("server RSS max", f"{r['rss_max_mib']} MiB", f"goal <= {g['rss_mib']:.0f} MB"),
        line("full GC collections", r.get("gc_full_collections"), "server process, start to end of the run"),
        line("server CPU per device", f"{r['cpu_ms_per_device']} ms", f"({r['server_cpu_seconds']} s in all)")]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for each size, print the figures beside their goals (stderr) and as JSON
    (stdout); exit 1 when a rollout did not succeed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10000, help="one fleet size (default 10000)")
    parser.add_argument("--sizes", help="several fleet sizes, comma-separated (e.g. 10000,30000,100000)")
    parser.add_argument("--waves", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a rollout may take per size")
    parser.add_argument("--publishers", type=int, default=2, help="simulated-fleet processes (MQTT connections)")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between a device's heartbeats")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ingest-processes", type=int, default=None,
                        help="the server's ingest.processes (default: the server's default)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the store: embedded SQLite (default) or a PostgreSQL started for the run")
    parser.add_argument("--replicas", type=int, default=1,
                        help="fleet-server replicas sharing the PostgreSQL store and an MQTT share group")
    args = parser.parse_args(argv)
    if args.replicas < 1 or (args.replicas > 1 and args.store != "postgresql"):
        parser.error("--replicas above 1 needs --store postgresql (one process owns a SQLite store)")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.devices]
    runs = []
    for size in sizes:
        try:
            result = run(size, waves=args.waves, timeout=args.timeout, publishers=args.publishers,
                         heartbeat=args.heartbeat, seed=args.seed, ingest_processes=args.ingest_processes,
                         store=args.store, replicas=args.replicas)
        except Exception as exc:  # one size failing must still leave the others' figures and a named gap
            result = {"devices": size, "waves": args.waves, "timeout": args.timeout, "finished": False,
                      "phase": f"benchmark failed: {type(exc).__name__}: {exc}"[:300]}
        runs.append(result)
        _log("\n".join(_goal_lines(result)))
    sys.stdout.write(json.dumps({"goals": GOALS, "runs": runs}, indent=2) + "\n")
    return 0 if all(r.get("finished") for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
