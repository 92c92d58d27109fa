"""Bad input at every door.

1. The trust attack list end to end through a real ``git daemon`` mirror: every attack is pushed as
   a commit and a real agent (``sync_once``, the body of ``edge-agent sync --once``) must refuse it
   with the device root byte-identical and its installed release unchanged; afterwards a clean
   signed release still applies.
2. 10,000 fuzzed MQTT payloads (a seeded generator: mutated valid messages and random bytes) on
   device topics through a real Mosquitto at a running ``fleet-server`` process: the process
   survives, and ``/metrics`` accounts for every message as ingested or dropped.
3. The HTTP API of that server fuzzed from its own OpenAPI description with schemathesis: zero 5xx.
4. Device A impersonating device B at a Mosquitto configured by ``fleetctl broker-config``: refused.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import status, sync_once
from edge_agent.config import load_config
from edge_agent.identity import init_identity
from edge_agent.report.mqtt import MqttLink, MqttSettings
from edge_core import messages as m
from edge_core.trust.keys import format_verify_key, parse_encryption_public
from edge_core.trust.manifest import MANIFEST_PATH
from edge_core.trust.sealed import seal
from fleet_server.config import StoreConfig
from fleet_server.metrics import DROP_REASONS
from fleet_server.signing import rotate_root
from tests.support.agent_fleet import AgentFleet, base_release, bundle, snapshot
from tests.support.broker import Mosquitto, Subscriber
from tests.support.mirror import free_port, wait_for_port
from tests.support.procs import Proc
from tests.support.stores import store_section
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BIN = Path(sys.executable).parent
FUZZ_COUNT = 10_000
FUZZ_SEED = 20240607
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- 1. the trust attack list through a real mirror ------------------------------------------------


def _git(work: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(work), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def test_every_trust_attack_is_refused_and_the_device_left_byte_identical(fleet: AgentFleet) -> None:
    v1 = fleet.publish(dict(base_release(fleet.root)), floor=1)
    assert sync_once(fleet.config).outcome == "applied"
    v2 = fleet.publish({"bundles/app/files/app.conf": "listen = 8443\nupstream = two\n"}, floor=2)
    assert sync_once(fleet.config).outcome == "applied"
    good = v2
    before = snapshot(fleet.root)
    state_before = status(fleet.config)["installed"]
    other_key = SigningKey.generate()
    ident = init_identity(fleet.config.state_dir)
    own_box = parse_encryption_public(ident.encryption_public)
    assert own_box != PrivateKey.generate().public_key

    def reset() -> None:
        _git(fleet.work.path, "reset", "--hard", good)
        _git(fleet.work.path, "clean", "-fdq")
        fleet.version = 2

    def tampered() -> None:
        fleet.push_unsigned({"bundles/app/files/app.conf": "listen = 1\nupstream = evil\n"})

    def added() -> None:
        fleet.push_unsigned({"bundles/app/files/extra.conf": "sneaked in\n"})

    def removed() -> None:
        fleet.work.remove("bundles/app/files/app.conf")
        fleet.work.commit("drop a file")
        fleet.work.push(fleet.bare, force=True)

    def untrusted_key() -> None:
        fleet.publish({"bundles/app/files/app.conf": "x\n"}, keys=[other_key])

    def below_threshold() -> None:
        # the device now trusts two keys and wants both; the release carries one signature
        data = yaml.safe_load(fleet.config_path.read_text())
        data["trust"] = {"keys": [format_verify_key(fleet.key.verify_key),
                                  format_verify_key(other_key.verify_key)], "threshold": 2}
        fleet.config_path.write_text(yaml.safe_dump(data))
        fleet.config = load_config(fleet.config_path)
        fleet.publish({"bundles/app/files/app.conf": "one signature\n"})

    def expired() -> None:
        fleet.publish({"bundles/app/files/app.conf": "stale\n"}, expires=timedelta(days=1),
                      now=datetime.now(UTC) - timedelta(days=2))

    def below_floor() -> None:
        # the correctly signed release 1 (floor 1) replayed by the mirror below the device's floor 2
        _git(fleet.work.path, "reset", "--hard", v1)
        fleet.work.push(fleet.bare, force=True)

    def malformed_manifest() -> None:
        fleet.push_unsigned({MANIFEST_PATH: '{"signed": {"type": "edge-fleet/release", "version": '})

    def oversized_manifest() -> None:
        fleet.push_unsigned({MANIFEST_PATH: '{"signed": {"pad": "' + "x" * (9 * 1024 * 1024) + '"}}'})

    def traversal_path() -> None:
        fleet.publish({"bundles/app/bundle.yaml": bundle([
            {"kind": "file", "path": "/etc/../../escaped", "content": "out\n"}])})

    def secret_for_another_device() -> None:
        doc = seal(b"not for this device", secret_id="other", version=1,
                   recipients=[PrivateKey.generate().public_key])
        fleet.publish({"secrets/other.sealed.json": doc.decode(), "bundles/app/bundle.yaml": bundle([
            {"kind": "secret_file", "path": "/etc/app/other.key", "secret": "secrets/other.sealed.json"},
            {"kind": "file", "path": "/etc/motd", "content": "managed by edge-fleet\n", "mode": "0644"}])})

    def rotation_by_new_keys_only() -> None:
        rotate_root(fleet.work.path, [format_verify_key(other_key.verify_key)], threshold=1,
                    signing_keys=[other_key])
        fleet.publish({"bundles/app/files/app.conf": "new root\n"}, keys=[other_key])

    attacks: dict[str, tuple[Callable[[], None], str]] = {
        "tampered file": (tampered, "app.conf"),
        "added file": (added, "extra.conf"),
        "removed file": (removed, "app.conf"),
        "untrusted key": (untrusted_key, "trusted"),
        "below threshold": (below_threshold, "required"),
        "expired": (expired, "expire"),
        "below floor": (below_floor, "floor"),
        "malformed manifest": (malformed_manifest, "json"),
        "oversized manifest": (oversized_manifest, "over the cap"),
        "traversal path": (traversal_path, ".."),
        "sealed secret for another device": (secret_for_another_device, "not a recipient"),
        "rotation signed only by new keys": (rotation_by_new_keys_only, "trusted key"),
    }
    config_text = fleet.config_path.read_text()
    reasons: dict[str, str] = {}
    for name, (attack, needle) in attacks.items():
        attack()
        result = sync_once(fleet.config)
        reasons[name] = f"{result.outcome}: {result.reason}"
        assert result.outcome in ("refused", "failed", "fetch_failed"), (name, result)
        assert result.outcome != "applied"
        assert needle.lower() in (result.reason or "").lower(), (name, result.reason)
        assert snapshot(fleet.root) == before, f"{name}: the device root changed"
        assert status(fleet.config)["installed"] == state_before, name
        fleet.config_path.write_text(config_text)
        fleet.config = load_config(fleet.config_path)
        reset()
    lines = [f"  {k:34} {v[:110]}" for k, v in reasons.items()]
    print("\ntrust attacks through the mirror:\n" + "\n".join(lines))
    refusals = [p for t, p in fleet.outbox() if t.endswith("/events") and b'"type":"sync_refused"' in p]
    assert len(refusals) >= len(attacks) - 1  # each attack reported (a repeat of one reason may be folded)
    fleet.version = 2
    fleet.publish({"bundles/app/files/app.conf": "listen = 8443\nupstream = three\n"}, floor=2)
    assert sync_once(fleet.config).outcome == "applied"
    assert (fleet.root / "etc/app/app.conf").read_text().endswith("upstream = three\n")


# --- 2 and 3. a running fleet-server: fuzzed MQTT payloads, fuzzed HTTP API -------------------------


def _valid_messages(device: str, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """Valid messages of each kind for "fz-0", carrying ``device`` (which may itself be invalid)."""
    ts = 1_700_000_000.0 + rng.random() * 1e6
    return [(kind, {**msg, "device": device}) for kind, msg in _messages_of("fz-0", ts)]


def _messages_of(device: str, ts: float) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("status", m.status_message(device, commit=COMMIT, release=3, sync_state="in_sync", drift={},
                                    paused=False, ts=ts)),
        ("events", m.event_message(device, type="sync_succeeded", commit=COMMIT, release=3, ts=ts,
                                   detail={"changes": 2})),
        ("online", m.online_message(device, online=True, ts=ts)),
    ]


_WEIRD: list[Any] = [None, True, -1, 2**70, 1e308, float("nan"), "", "x" * 5000, [], {}, [[[[[]]]]],
                     "\u0000", "\ud7ff\ufffd", {"$where": 1}, "../../etc", "💥"]


def _mutate_obj(obj: Any, rng: random.Random) -> Any:
    if isinstance(obj, dict) and obj:
        out = dict(obj)
        key = rng.choice(list(out))
        action = rng.randrange(4)
        if action == 0:
            del out[key]
        elif action == 1:
            out[key] = rng.choice(_WEIRD)
        elif action == 2:
            out[key] = _mutate_obj(out[key], rng)
        else:
            out[rng.choice(["extra", key.upper(), key + "_", "schema"])] = rng.choice(_WEIRD)
        return out
    if isinstance(obj, list) and obj:
        return [_mutate_obj(x, rng) for x in obj]
    return rng.choice(_WEIRD)


def fuzz_payload(rng: random.Random, device: str, kind: str) -> bytes:
    """One fuzzed payload: a mutated valid message, mangled JSON, random bytes or an oversized blob."""
    valid = dict(_valid_messages(device, rng))
    base = valid.get(kind) or valid["status"]
    roll = rng.random()
    if roll < 0.35:
        return json.dumps(_mutate_obj(base, rng), allow_nan=True).encode()
    if roll < 0.5:
        raw = bytearray(json.dumps(base).encode())
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if roll < 0.6:
        whole = json.dumps(base).encode()
        return whole[:rng.randrange(len(whole))]
    if roll < 0.7:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if roll < 0.75:
        return json.dumps(rng.choice(_WEIRD)).encode() if rng.random() < 0.5 else b"[" * 5000
    if roll < 0.77:
        return b'{"pad": "' + b"x" * rng.choice([70_000, 300_000]) + b'"}'
    if roll < 0.85:
        other = dict(base)
        other["device"] = "someone-else"  # spoofed: another device's id on this device's topic
        return json.dumps(other).encode()
    return json.dumps(base).encode()  # valid: must be stored


def _device_id(rng: random.Random) -> str:
    if rng.random() < 0.85:
        return f"fz-{rng.randrange(50)}"
    weird: list[str] = ["dev with space", "ünïcode", "a" * 200, "x.y_z-1",
                       "%s%n", "'; DROP TABLE devices; --", "fz-0"]
    return rng.choice(weird)


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


class RunningServer:
    """``fleet-server`` on ``store`` (either backend) with its own Mosquitto, stopped by pid."""

    def __init__(self, tmp: Path, store: StoreConfig) -> None:
        self.tmp = tmp
        self.broker = Mosquitto(tmp / "broker", extra_lines=["max_inflight_messages 1000",
                                                             "max_queued_messages 100000",
                                                             "message_size_limit 0"])
        self.broker.start()
        self.http = free_port()
        self.token = "fuzz-admin-token-0123456789"
        (tmp / "admin.token").write_text(self.token + "\n")
        (tmp / "admin.token").chmod(0o600)
        cfg = {"mqtt": {"host": "127.0.0.1", "port": self.broker.port, "keepalive": 5},
               "store": store_section(store),
               "http": {"host": "127.0.0.1", "port": self.http, "admin_token_file": str(tmp / "admin.token")},
               # a watcher whose mirror is not there: the webhook is served, every poll fails
               "git": {"url": f"git://127.0.0.1:{free_port()}/fleet.git", "branch": "main",
                       "poll_interval": "1h", "cache_dir": str(tmp / "server-git"),
                       "trust": {"keys": [format_verify_key(SigningKey.generate().verify_key)],
                                 "threshold": 1}}}
        (tmp / "server.yaml").write_text(yaml.safe_dump(cfg))
        self.proc = Proc([BIN / "fleet-server", "--config", tmp / "server.yaml"], tmp / "server.log")
        wait_for_port(self.http, timeout=20)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as resp:
            data: bytes = resp.read()
            return data.decode()

    def stop(self) -> None:
        self.proc.stop()
        self.broker.stop()


@pytest.fixture
def server(tmp_path: Path, store_config: StoreConfig) -> Iterator[RunningServer]:
    srv = RunningServer(tmp_path, store_config)
    try:
        yield srv
    finally:
        srv.stop()


def test_ten_thousand_fuzzed_mqtt_payloads_are_all_stored_or_counted(server: RunningServer) -> None:
    wait_until(lambda: "fleet_messages_ingested_total" in server.get("/metrics"), "the server's metrics", 20)
    rng = random.Random(FUZZ_SEED)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", server.broker.port, keepalive=10)
    client.loop_start()
    t0 = time.monotonic()
    try:
        infos = []
        for _ in range(FUZZ_COUNT):
            device = _device_id(rng)
            kind = rng.choice(["status", "events", "health", "online"])
            infos.append(client.publish(f"fleet/v1/{device}/{kind}", fuzz_payload(rng, device, kind), qos=1))
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    sent_in = time.monotonic() - t0

    def accounted() -> float:
        text = server.get("/metrics")
        return _metric(text, "fleet_messages_ingested_total") + _metric(text, "fleet_messages_dropped_total")

    try:
        wait_until(lambda: accounted() >= FUZZ_COUNT, "every fuzzed message to be counted", 30, 0.2)
    except AssertionError as exc:
        log = server.proc.log.read_text(errors="replace")
        raise AssertionError(f"{exc}; counted {accounted():.0f}; server log tail: {log[-1500:]}") from exc
    text = server.get("/metrics")
    ingested = _metric(text, "fleet_messages_ingested_total")
    dropped = {r: _metric(text, rf'fleet_messages_dropped_total{{reason="{r}"}}')
               for r in DROP_REASONS}
    print(f"\nMQTT fuzz: {FUZZ_COUNT} payloads (seed {FUZZ_SEED}) published in {sent_in:.1f}s; "
          f"ingested {ingested:.0f}, dropped {sum(dropped.values()):.0f} {dropped}")
    assert server.proc.p.poll() is None, "fleet-server died under fuzzed input"
    assert ingested + sum(dropped.values()) == FUZZ_COUNT
    assert ingested > 0
    assert dropped["malformed_json"] > 0
    assert dropped["bad_schema"] > 0
    assert dropped["oversized"] > 0
    assert dropped["spoofed"] > 0
    assert "Traceback" not in server.proc.log.read_text(errors="replace")
    assert json.loads(server.get("/healthz")) is not None


def test_http_api_fuzzed_from_its_openapi_description_answers_no_5xx(server: RunningServer,
                                                                     tmp_path: Path) -> None:
    schemathesis = shutil.which("schemathesis", path=str(BIN)) or shutil.which("st", path=str(BIN))
    if schemathesis is None:
        pytest.skip("schemathesis is not installed in the environment")
    spec = json.loads(server.get("/api/v1/openapi.json"))
    assert spec["paths"]
    report = tmp_path / "schemathesis.txt"
    # Without a token every request meets the same guard before any handler runs, so a quarter of
    # the examples covers it; with the admin token each operation gets the full hundred.
    for headers, examples in (([], 25), (["-H", f"Authorization: Bearer {server.token}"], 100)):
        done = subprocess.run(
            [schemathesis, "run", f"http://127.0.0.1:{server.http}/api/v1/openapi.json", "--checks",
             "not_a_server_error", "--max-examples", str(examples), "--seed", "7", "--request-timeout", "10",
             "--phases", "examples,fuzzing", *headers],
            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
        report.write_text(done.stdout + done.stderr)
        tail = "\n".join(done.stdout.splitlines()[-12:])
        print(f"\nschemathesis ({'admin token' if headers else 'no token'}):\n{tail}")
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert server.proc.p.poll() is None


# --- 4. device A impersonating device B at the broker ----------------------------------------------


def test_device_a_cannot_pass_for_device_b_at_the_broker(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "broker-files"
    done = subprocess.run([BIN / "fleetctl", "broker-config", "--out", out, "--devices", "dev-a", "dev-b",
                           "--server-user", "fleet-server", "--port", str(port), "--bind", "127.0.0.1"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr

    def password(user: str) -> str:
        return (out / "credentials" / f"{user}.password").read_text().strip()

    conf = (out / "mosquitto.conf").read_text()
    with Mosquitto(tmp_path / "mosquitto", port=port, base_config=conf), \
            Subscriber(port, ["fleet/v1/#"], client_id="fleet-server", user="fleet-server",
                       password=password("fleet-server")) as server:
        server.wait_subscribed(1)
        # B's name with A's password: not authenticated
        fake_b = MqttLink(MqttSettings(host="127.0.0.1", port=port, device_id="dev-b", username="dev-b",
                                       password=password("dev-a"), reconnect_min=0.2, reconnect_max=0.5))
        fake_b.start()
        try:
            assert not fake_b.wait_connected(2)
        finally:
            fake_b.stop(offline_wait=0.5)
        # A, authenticated as itself, publishing B's reports: refused by the ACL (0x87)
        link = MqttLink(MqttSettings(host="127.0.0.1", port=port, device_id="dev-a", username="dev-a",
                                     password=password("dev-a"), reconnect_min=0.2, reconnect_max=0.5))
        link.start()
        try:
            assert link.wait_connected(10)
            spoof = m.encode(m.status_message("dev-b", commit=COMMIT, release=9, sync_state="in_sync",
                                              drift={}, paused=False, ts=1_700_000_000.0))
            attempts = [link.publish(f"fleet/v1/dev-b/{kind}", spoof, qos=1) for kind in
                        ("status", "events", "health", "online")]
            own = link.publish("fleet/v1/dev-a/status", m.encode(m.status_message(
                "dev-a", commit=COMMIT, release=1, sync_state="in_sync", drift={}, paused=False,
                ts=1_700_000_001.0)), qos=1)
            for tracking in attempts:
                assert tracking.wait(10)
                assert tracking.refused
                assert tracking.reason_code == 0x87
            assert own.wait(10)
            assert not own.refused
            assert server.wait(lambda s: any(r.topic == "fleet/v1/dev-a/status" for r in s.received))
        finally:
            link.stop(offline_wait=0.5)
        assert not [r for r in server.messages() if "/dev-b/" in r.topic]
