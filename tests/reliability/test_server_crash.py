"""Fleet-server crash, under ingest and mid-rollout.

Under ingest: SIGKILL the ``fleet-server`` process twice while 20 devices publish numbered QoS 1
events; after each restart (same client id: the broker kept its persistent session and queued what
came meanwhile) every event the devices' outboxes deleted, i.e. that the broker acknowledged, must
end up in the store exactly once. Devices are the agent's real reporting stack (state database +
outbox, ``MqttLink``, ``OutboxSender``; see ``test_broker_outage.py``), in one forked process.

Mid-rollout: ten ``edge-agent run`` processes follow signed releases from a real ``git daemon``
mirror; a rollout of release 2 started through ``POST /api/v1/rollouts`` is SIGKILLed twice (while
wave 1 waits for approval, and the moment wave 2's first assignment reaches the broker) and the
server is restarted on the same ports and database. ``mosquitto_sub`` records every ``desired``
message for the whole run: no device is ever assigned a release its wave is not entitled to, and
the rollout resumes from its persisted state to ``succeeded`` with every device on release 2.

The server is the real ``fleet-server`` command on each store backend (an SQLite file, a
PostgreSQL database), the broker a real Mosquitto; see docs/reliability.md, section 5.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet_server.config import StoreConfig
from fleet_server.store import open_store
from tests.support.broker import Mosquitto, Subscriber
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.mirror import GitDaemon, free_port, wait_for_port
from tests.support.procs import Proc
from tests.support.sim_device import SimDevice
from tests.support.stores import select, store_section
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
DEVICES = 20
RATE = 10.0  # events per second per device
RUN = 12.0  # seconds of reporting
KILLS_AT = (3.0, 7.5)  # seconds after the start
DOWN = 1.5  # seconds the server stays dead


def device_host(port: int, ids: list[str], work: Path, go: Path, out: Path) -> None:
    """Forked: the devices report RATE x RUN events each at RATE a second, then drain their outboxes."""
    result: dict[str, Any] = {"error": None}
    devices: list[SimDevice] = []
    try:
        devices = [SimDevice(i, port, work / i) for i in ids]
        for d in devices:
            d.start()
        wait_until(lambda: all(d.link.connected for d in devices), "every device to connect", 30)
        (work / "ready").write_text("")
        wait_until(go.exists, "the start signal", 60, 0.01)
        started = time.monotonic()
        tick = 0
        # count-bounded (a loaded machine paces slower but still sends every event), and time-bounded
        while tick < int(RATE * RUN) and time.monotonic() - started < 3 * RUN:
            for d in devices:
                d.emit()
            tick += 1
            time.sleep(max(0.0, tick / RATE - (time.monotonic() - started)))
        wait_until(lambda: all(d.state.outbox_count() == 0 for d in devices), "every outbox to drain", 60)
        result["sent"] = {d.id: d.seq for d in devices}
        result["refused"] = sum(d.sender.refused for d in devices)
    except BaseException as exc:  # reported to the parent through the result file
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for d in devices:
            d.stop()
    out.write_text(json.dumps(result))


def stored_seqs(store: StoreConfig) -> dict[str, list[int]]:
    """Device id -> the ``seq`` of each event stored for it, in the order stored."""
    rows = select(store, "SELECT device, detail FROM events ORDER BY id")
    out: dict[str, list[int]] = {}
    for device, detail in rows:
        out.setdefault(device, []).append(int(json.loads(detail)["detail"]["seq"]))
    return out


def test_sigkill_of_the_fleet_server_under_ingest_loses_nothing_acknowledged(
        tmp_path: Path, store_config: StoreConfig) -> None:
    with Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000",
                                                     "max_queued_messages 100000"]) as broker:
        ids = [f"dev-{n:02d}" for n in range(DEVICES)]
        go = tmp_path / "go"
        work = tmp_path / "host"
        work.mkdir()
        host = multiprocessing.get_context("fork").Process(
            target=device_host, args=(broker.port, ids, work, go, tmp_path / "result.json"))
        host.start()
        http = free_port()
        cfg = {"mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5,
                        "client_id": "fleet-server-crash"},
               "store": store_section(store_config),
               "http": {"host": "127.0.0.1", "port": http}}
        (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg))
        argv: list[str | Path] = [BIN / "fleet-server", "--config", tmp_path / "server.yaml"]
        servers = [Proc(argv, tmp_path / "server-0.log")]
        try:
            wait_for_port(http, timeout=20)
            wait_until((work / "ready").exists, "the devices", 60)
            go.write_text("")
            started = time.monotonic()
            for n, at in enumerate(KILLS_AT, 1):
                time.sleep(max(0.0, at - (time.monotonic() - started)))
                servers[-1].p.send_signal(signal.SIGKILL)
                servers[-1].wait(10)
                time.sleep(DOWN)
                servers.append(Proc(argv, tmp_path / f"server-{n}.log"))
                wait_for_port(http, timeout=20)
            host.join(timeout=RUN + 90)
            if host.is_alive():
                host.kill()
                host.join(timeout=10)
            result = json.loads((tmp_path / "result.json").read_text())
            assert result["error"] is None, result
            sent: dict[str, int] = result["sent"]
            total = sum(sent.values())

            def stored_total() -> int:
                return sum(len(v) for v in stored_seqs(store_config).values())

            wait_until(lambda: stored_total() >= total, "the restarted server to store everything", 60, 0.2)
        finally:
            for s in servers:
                s.stop()
            if host.is_alive():
                host.kill()
                host.join(timeout=10)
    stored = stored_seqs(store_config)
    print(f"\nserver crash: {len(ids)} devices sent {total} events over {RUN:.0f}s; "
          f"fleet-server SIGKILLed at {KILLS_AT} s, down {DOWN}s each time; "
          f"stored {sum(len(v) for v in stored.values())}; "
          f"refused by the broker {result['refused']}")
    assert result["refused"] == 0
    for dev in ids:
        assert sorted(stored.get(dev, [])) == list(range(sent[dev])), f"{dev}: missing or duplicated events"
    assert min(sent.values()) == int(RATE * RUN), "the device host did not send every event in 3x the time"


# --- mid-rollout ---------------------------------------------------------------------------------

FLEET = 10  # devices; the first CANARIES are labelled canary: "true"
CANARIES = 3
TOKEN = "crash-admin-token"


def release_files(version: int) -> dict[str, str | bytes]:
    """Release ``version``: /etc/motd on every gateway names it (the devices' files show what they run)."""
    bundle = {"targets": [{"labels": {"role": "gateway"}}],
              "resources": [{"kind": "file", "path": "/etc/motd", "content": f"release {version}\n",
                             "mode": "0644"}],
              # the gateway profile runs no command of the release, health checks included
              "health": [{"kind": "disk_free", "name": "ok", "path": "/", "min_free_percent": 0,
                          "timeout": 5}]}
    return {"fleet.yaml": "description: server crash fleet\n",
            "bundles/motd/bundle.yaml": yaml.safe_dump(bundle)}


def fleetctl(*args: str | Path) -> str:
    """Run ``fleetctl`` (bounded); return its stdout; fail the test on a non-zero exit."""
    done = subprocess.run([str(BIN / "fleetctl"), *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def call(port: int, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET ``path`` (or POST ``body`` with the admin token) on the server's API; return the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 method="GET" if body is None else "POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "X-Actor": "crash-test",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        if body is None:
            raise
        raise AssertionError(f"POST {path}: {exc.code} {exc.read().decode(errors='replace')}") from exc


def answers(port: int, path: str) -> Any | None:
    """GET ``path``; None while the server does not answer (it is starting)."""
    try:
        return call(port, path)
    except OSError:
        return None


def phase(port: int, rid: str) -> str | None:
    """The rollout's phase as the API shows it (None while the server does not answer)."""
    detail = answers(port, f"/api/v1/rollouts/{rid}")
    return None if detail is None else str(detail["phase"])


def releases_run(port: int) -> dict[str, Any]:
    """Device id -> the release its last status reported, from the API (empty while it does not answer)."""
    listing = answers(port, f"/api/v1/devices?limit={FLEET + 10}")
    return {} if listing is None else {d["id"]: d.get("release") for d in listing["devices"]}


def stored_device_states(store: StoreConfig, rid: str) -> dict[str, str]:
    """The per-device engine states of rollout ``rid`` as last committed (read after a SIGKILL)."""
    assert re.fullmatch(r"[A-Za-z0-9_-]+", rid), rid  # an id the server made, quoted into the query
    rows = select(store, f"SELECT device, state FROM rollout_devices WHERE rollout_id = '{rid}'")
    return {str(d): str(s) for d, s in rows}


def ts_of(payload: dict[str, Any]) -> float:
    """The POSIX time of a message's RFC 3339 ``ts`` (the server's clock when it published)."""
    return datetime.fromisoformat(str(payload["ts"]).replace("Z", "+00:00")).timestamp()


class CrashWorld:
    """A mirror with signed releases, a broker, the real ``fleet-server`` (restartable on the same
    ports and database) and ``edge-agent run`` processes; everything stopped by pid."""

    def __init__(self, tmp: Path, daemon: GitDaemon, broker: Mosquitto, store: StoreConfig) -> None:
        self.tmp = tmp
        self.key = tmp / "operator.key"
        self.pub = fleetctl("keys", "generate", "--out", self.key).strip()
        self.bare = make_bare(tmp / "mirrors" / "fleet.git")
        self.work = WorkRepo.create(tmp / "work")
        self.commits: dict[int, str] = {}
        self.http = free_port()
        self.store = store
        self.ids = [f"gw-{n:02d}" for n in range(FLEET)]
        (tmp / "admin.token").write_text(TOKEN + "\n")
        (tmp / "admin.token").chmod(0o600)
        cfg = {"mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5,
                        "client_id": "fleet-server-rollout-crash"},
               "store": store_section(store),
               "http": {"host": "127.0.0.1", "port": self.http, "admin_token_file": str(tmp / "admin.token")},
               "git": {"url": daemon.url("fleet.git"), "branch": "main", "poll_interval": "1h",
                       "cache_dir": str(tmp / "server-git"), "trust": {"keys": [self.pub], "threshold": 1}}}
        (tmp / "server.yaml").write_text(yaml.safe_dump(cfg))
        self.servers: list[Proc] = []
        self.agents: list[Proc] = []
        self.daemon = daemon
        self.broker = broker

    def publish(self, version: int) -> None:
        """Sign release ``version`` (``fleetctl release sign``), push it, have the watcher record it."""
        self.work.write_files(release_files(version))
        fleetctl("release", "sign", self.work.path, "--key", self.key)
        self.commits[version] = self.work.commit_and_push(self.bare, {}, f"release {version}")
        call(self.http, "/api/v1/hooks/git", {})
        def recorded() -> bool:
            listing = answers(self.http, "/api/v1/releases") or {"releases": []}
            return any(r["version"] == version and r["commit"] == self.commits[version]
                       for r in listing["releases"])

        wait_until(recorded, f"the watcher to record release {version}", 20, 0.1)

    def labels(self, dev: str) -> dict[str, str]:
        """The labels of ``dev``: every device is a gateway, the first CANARIES are canaries."""
        return {"role": "gateway", **({"canary": "true"} if self.ids.index(dev) < CANARIES else {})}

    def register(self) -> None:
        """Register the devices and their labels before the server first starts."""
        store = open_store(self.store)
        try:
            for dev in self.ids:
                store.register_device(dev, labels=self.labels(dev), profile="gateway")
        finally:
            store.close()

    def start_server(self) -> None:
        n = len(self.servers)
        self.servers.append(Proc([BIN / "fleet-server", "--config", self.tmp / "server.yaml"],
                                 self.tmp / f"server-{n}.log"))
        proc = self.servers[-1].p
        wait_for_port(self.http, timeout=20, alive=lambda: proc.poll() is None)

    def kill_server(self) -> None:
        """SIGKILL the running server by pid and reap it."""
        server = self.servers[-1]
        os.kill(server.pid, signal.SIGKILL)
        assert server.wait(10) == -signal.SIGKILL

    def start_agents(self) -> None:
        for dev in self.ids:
            d = self.tmp / "devices" / dev
            (d / "root").mkdir(parents=True)
            cfg = {"device_id": dev, "labels": self.labels(dev), "profile": "gateway",
                   "profile_dirs": [str(REPO / "device_profiles")],
                   "repo": {"url": self.daemon.url("fleet.git"), "timeout": "5s"},
                   "trust": {"keys": [self.pub]},
                   "mqtt": {"host": "127.0.0.1", "port": self.broker.port, "keepalive": 5},
                   "backoff": {"base": "100ms", "cap": "1s"},
                   "intervals": {"poll": "1h", "drift": "1h", "health": "1h"},
                   "root": str(d / "root"), "state_dir": str(d / "state")}
            (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
            self.agents.append(Proc([BIN / "edge-agent", "run", "--config", d / "agent.yaml"],
                                    d / "agent.log"))

    def motd(self, dev: str) -> str | None:
        path = self.tmp / "devices" / dev / "root" / "etc" / "motd"
        return path.read_text() if path.exists() else None

    def wait_phase(self, rid: str, want: str, limit: float) -> None:
        wait_until(lambda: phase(self.http, rid) == want, f"rollout {rid} to be {want} "
                   f"(is {phase(self.http, rid)})", limit, 0.1)

    def stop(self) -> None:
        for p in [*self.agents, *self.servers]:
            p.stop()


def test_sigkill_of_the_fleet_server_mid_rollout_resumes_without_a_wrong_assignment(
        tmp_path: Path, store_config: StoreConfig) -> None:
    with GitDaemon(tmp_path / "mirrors") as daemon, Mosquitto(tmp_path / "broker") as broker, \
            Subscriber(broker.port, ["fleet/v1/+/desired"], client_id="desired-recorder") as recorder:
        recorder.wait_subscribed(1)
        world = CrashWorld(tmp_path, daemon, broker, store_config)
        try:
            started = time.monotonic()
            world.register()
            world.start_server()
            world.publish(1)
            world.start_agents()
            wait_until(lambda: all(releases_run(world.http).get(d) == 1 for d in world.ids),
                       "every agent to run release 1 and report it", 30, 0.2)
            pin = call(world.http, "/api/v1/rollouts", {
                "release": 1, "reason": "pin release 1",
                "plan": {"canary_first": False, "waves": [{"percent": 100, "soak": 0, "timeout": 30}]}})["id"]
            world.wait_phase(pin, "succeeded", 20)
            world.publish(2)  # recorded and nudged; assigned devices stay on release 1

            mark: dict[str, int] = {"start": len(recorder.messages())}
            rid = call(world.http, "/api/v1/rollouts", {"release": 2, "reason": "release 2", "plan": {
                "name": "crash", "waves": [
                    {"name": "canary", "soak": 0, "timeout": 30, "promotion": "manual"},
                    {"name": "second", "percent": 60, "soak": 1, "timeout": 30, "promotion": "manual"},
                    {"name": "rest", "percent": 100, "soak": 0, "timeout": 30}]}})["id"]
            world.wait_phase(rid, "waiting_approval", 30)
            members = call(world.http, f"/api/v1/rollouts/{rid}/devices?limit=1000")["devices"]
            waves = {s["id"]: int(s["wave"]) for s in members}
            assert sorted(d for d, w in waves.items() if w == 0) == world.ids[:CANARIES]

            # kill 1: wave 1 waits for approval; nothing may move on its own across the restart
            world.kill_server()
            time.sleep(1.0)
            world.start_server()
            time.sleep(2.0)  # two ticks of the restarted runner
            assert phase(world.http, rid) == "waiting_approval"
            assert all(releases_run(world.http).get(d) == (2 if w == 0 else 1) for d, w in waves.items())

            mark["promote-1"] = len(recorder.messages())
            call(world.http, f"/api/v1/rollouts/{rid}/promote", {"reason": "canaries fine"})
            second = sorted(d for d, w in waves.items() if w == 1)

            def second_wave_assigned() -> bool:
                return any(m.topic == f"fleet/v1/{d}/desired" and json.loads(m.payload)["release"] == 2
                           for m in recorder.messages() for d in second)

            # kill 2: the moment wave 2's first assignment reaches the broker, before its devices report
            wait_until(second_wave_assigned, "wave 2's first assignment", 20, 0.005)
            world.kill_server()
            at_kill = {d: s for d, s in stored_device_states(world.store, rid).items() if d in second}
            assert "assigned" in at_kill.values(), f"the kill came after wave 2 reported: {at_kill}"
            time.sleep(1.0)
            world.start_server()
            world.wait_phase(rid, "waiting_approval", 30)
            detail = call(world.http, f"/api/v1/rollouts/{rid}")
            assert detail["wave"] == 1
            listed = call(world.http, f"/api/v1/rollouts/{rid}/devices?limit=1000")["devices"]
            assert all(s["state"] == "applied" for s in listed if waves[s["id"]] <= 1)

            mark["promote-2"] = len(recorder.messages())
            call(world.http, f"/api/v1/rollouts/{rid}/promote", {"reason": "second wave fine"})
            world.wait_phase(rid, "succeeded", 30)
            wait_until(lambda: all(releases_run(world.http).get(d) == 2 for d in world.ids),
                       "every device to report release 2", 30, 0.2)
            elapsed = time.monotonic() - started
            final = call(world.http, f"/api/v1/rollouts/{rid}")
            # the retained assignment each device would find on connecting now
            with Subscriber(broker.port, ["fleet/v1/+/desired"], client_id="retained-check") as check:
                check.wait_subscribed(1)
                check.wait(lambda s: len(s.messages()) >= FLEET, 10)
                retained = {m.topic.split("/")[2]: json.loads(m.payload)
                            for m in check.messages() if m.retained}
        finally:
            world.stop()
        desired = recorder.messages()

    # every device ends on release 2, on disk
    for dev in world.ids:
        assert world.motd(dev) == "release 2\n", dev
    # every desired message names release 1 or 2 with its commit, for the device of its topic
    by_device: dict[str, list[tuple[int, dict[str, Any]]]] = {d: [] for d in world.ids}
    for i, m in enumerate(desired):
        payload = json.loads(m.payload)
        dev = m.topic.split("/")[2]
        assert payload["device"] == dev, m
        assert payload["release"] in (1, 2), m
        assert payload["revision"] == world.commits[payload["release"]], m
        assert payload["rollout_id"] in (pin, rid), m
        by_device[dev].append((i, payload))
    started_at = [float(w["started"]) for w in final["waves"]]
    for dev, seen in by_device.items():
        releases = [p["release"] for _, p in seen]
        assert releases, dev
        assert releases[-1] == 2, (dev, releases)
        assert releases == sorted(releases), f"{dev} went back: {releases}"  # 1 ... 1, 2 ... 2
        wave = waves[dev]
        entitled_from = mark["start"] if wave == 0 else mark[f"promote-{wave}"]
        for i, p in seen:
            if p["release"] == 2:
                assert p["rollout_id"] == rid
                assert i >= entitled_from, f"{dev} (wave {wave + 1}) got release 2 before its wave started"
                assert ts_of(p) >= started_at[wave] - 0.01, f"{dev} assigned release 2 before its wave"
    assert {d: (p["release"], p["rollout_id"]) for d, p in retained.items()} == \
        {d: (2, rid) for d in world.ids}
    sizes = [sum(1 for w in waves.values() if w == k) for k in range(3)]
    print(f"\nserver crash mid-rollout: {FLEET} devices in waves of {sizes}; fleet-server SIGKILLed while "
          f"wave 1 waited for approval and as wave 2 was assigned (its devices' stored states then: "
          f"{sorted(at_kill.values())}); {len(desired)} desired messages recorded, none wrong; "
          f"{final['phase']} in {elapsed:.1f}s")
