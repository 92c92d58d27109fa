"""Webhook notifications against a real HTTP receiver on 127.0.0.1 (a small threaded http.server
here) and a real store on both backends: signatures the documented verifier accepts, deduplication,
retries across a server restart, give-up, a hanging receiver that delays no ingest, the events the
store's history and registry turn into, the delivery log over HTTP and the config section."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_core import messages as m
from fleet_server import fleetctl
from fleet_server.api import ApiActions, create_app
from fleet_server.config import ServerConfig, StoreConfig, parse_server_config
from fleet_server.errors import ServerConfigError
from fleet_server.ingest import Ingestor
from fleet_server.main import both_listeners
from fleet_server.metrics import ServerMetrics
from fleet_server.metrics_notify import NotificationMetrics
from fleet_server.notify.config import Receiver, parse_notifications
from fleet_server.notify.notifier import Notifier
from fleet_server.notify.sources import gate_events
from fleet_server.releases import GitWatcher
from fleet_server.rollouts.plan import parse_plan
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import FleetStore, IngestBatch, open_store
from tests.support.api_server import serve_app
from tests.support.rollout_world import NEW, ONE_WAVE, fleet_of, succeeded
from tests.support.rollout_world import Clock as RunnerClock
from tests.support.stores import run_sql
from tests.support.watcher_world import Fleet, watcher_fleet

SECRET = b"receiver-secret-for-tests"
DOC = Path(__file__).resolve().parent.parent / "docs" / "notifications.md"
ROUNDS = 200


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The Git watcher's world: a mirror served by git daemon, an operator key and a store."""
    with watcher_fleet(tmp_path) as world:
        yield world



def documented_verify() -> Callable[..., Any]:
    """The verification example of docs/notifications.md, executed as it is printed there."""
    text = DOC.read_text()
    block = re.search(r"### Verifying a notification \(Python\)\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    assert len(block.group(1).strip().splitlines()) <= 12
    scope: dict[str, Any] = {}
    exec(compile(block.group(1), str(DOC), "exec"), scope)
    return scope["verify"]


class Receiver_:
    """A webhook receiver on 127.0.0.1: verifies each request with the documented function and
    records it; answers ``status``; with ``hang`` set it blocks each request until released."""

    def __init__(self, port: int = 0, *, status: int = 204, hang: bool = False) -> None:
        self.status = status
        self.hang = threading.Event() if hang else None
        self.entered = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.verify = documented_verify()
        self.seen: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.entered.set()
                if owner.hang is not None:
                    owner.hang.wait(30.0)
                try:
                    note = owner.verify(SECRET, body, self.headers, owner.seen)
                except ValueError as exc:
                    owner.refused.append(str(exc))
                    self.send_response(403)
                    self.end_headers()
                    return
                owner.received.append({"headers": dict(self.headers), "note": note, "body": body})
                self.send_response(owner.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver_]]:
    started: list[Receiver_] = []

    def start(port: int = 0, **kwargs: Any) -> Receiver_:
        r = Receiver_(port, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receiver_config(tmp_path: Path, port: int, *, events: tuple[str, ...] = ("*",), **kw: Any) -> Receiver:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    return Receiver(name="ops", url=f"http://127.0.0.1:{port}/hook", events=events, secret_file=secret,
                    **{"timeout": 5.0, **kw})


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def deliver_all(notifier: Notifier, clock: Callable[[], float]) -> None:
    for _ in range(ROUNDS):
        if not notifier.deliver_due(clock()):
            return
    raise AssertionError("deliveries never settled")


def the_rows(store: FleetStore) -> list[dict[str, Any]]:
    return store.deliveries_page(limit=1000)[1]


def test_a_receiver_gets_a_signed_notification_it_verifies_once(any_store, tmp_path, receivers):
    hook = receivers()
    metrics = NotificationMetrics(ServerMetrics().registry)
    notifier = Notifier([receiver_config(tmp_path, hook.port)], any_store, metrics=metrics)
    assert notifier.notify("rollout.halted", {"rollout": "r1", "reason": "wave 1 failed"}, key="k1") == 1
    assert notifier.notify("rollout.halted", {"rollout": "r1", "reason": "wave 1 failed"}, key="k1") == 0
    deliver_all(notifier, time.time)
    assert hook.refused == []
    assert len(hook.received) == 1
    got = hook.received[0]
    assert got["note"]["event"] == "rollout.halted"
    assert got["note"]["data"] == {"rollout": "r1", "reason": "wave 1 failed"}
    assert got["headers"]["X-Fleet-Delivery"] == got["note"]["id"]
    assert got["headers"]["X-Fleet-Event"] == "rollout.halted"
    [row] = the_rows(any_store)
    assert (row["state"], row["attempts"], row["last_status"], row["event_id"]) == \
        ("delivered", 1, 204, got["note"]["id"])
    assert "body" not in row
    assert metrics.attempts.labels(receiver="ops", outcome="delivered")._value.get() == 1


def test_a_wrong_secret_is_refused_by_the_documented_verifier(tmp_path, receivers, any_store):
    hook = receivers()
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-secret\n")
    receiver = Receiver(name="ops", url=f"http://127.0.0.1:{hook.port}/", events=("*",), secret_file=wrong,
                        timeout=5.0)
    clock = Clock()
    notifier = Notifier([receiver], any_store, clock=clock)
    notifier.notify("release.refused", {"commit": "c" * 40})
    deliver_all(notifier, clock)
    assert hook.refused == ["bad signature"]
    [row] = the_rows(any_store)
    assert (row["state"], row["last_status"]) == ("pending", 403)
    assert row["next_attempt"] > clock.now


def test_a_receiver_down_then_up_gets_the_delivery_after_a_server_restart(store_config, tmp_path, receivers):
    port = free_port()  # nothing listens there yet: the receiver is down
    receiver = receiver_config(tmp_path, port)
    clock = Clock()
    store = open_store(store_config)
    try:
        first = Notifier([receiver], store, clock=clock)
        first.notify("rollout.rolled_back", {"rollout": "r7"}, key="rolled-back-r7")
        deliver_all(first, clock)
        [row] = the_rows(store)
        assert (row["state"], row["attempts"], row["last_status"]) == ("pending", 1, None)
        assert "no answer from 127.0.0.1" in row["last_error"]
    finally:
        store.close()  # the server stops
    hook = receivers(port)  # the receiver comes back
    clock.now = row["next_attempt"] + 0.001
    store = open_store(store_config)  # the server starts again
    try:
        second = Notifier([receiver], store, clock=clock)
        assert second.notify("rollout.rolled_back", {"rollout": "r7"}, key="rolled-back-r7") == 0
        deliver_all(second, clock)
        [row] = the_rows(store)
        assert (row["state"], row["attempts"]) == ("delivered", 2)
    finally:
        store.close()
    assert [r["note"]["data"] for r in hook.received] == [{"rollout": "r7"}]


def test_a_failing_receiver_is_retried_with_growing_delays_then_given_up(any_store, tmp_path, receivers):
    hook = receivers(status=500)
    clock = Clock()
    metrics = NotificationMetrics(ServerMetrics().registry)
    receiver = receiver_config(tmp_path, hook.port, retry_for=3600.0)
    notifier = Notifier([receiver], any_store, clock=clock, metrics=metrics, backoff_base=10.0,
                        backoff_cap=600.0)
    created = clock.now
    notifier.notify("device.offline", {"device": "dev-1"})
    delays = []
    for _ in range(30):
        deliver_all(notifier, clock)
        [row] = the_rows(any_store)
        if row["state"] != "pending":
            break
        delays.append(row["next_attempt"] - clock.now)
        clock.now = row["next_attempt"]
    assert row["state"] == "failed"
    assert row["last_status"] == 500
    assert row["last_attempt"] >= created + 3600.0
    # equal jitter: attempt n waits between half and all of min(cap, base * 2**n)
    for n, delay in enumerate(delays):
        ceiling = min(600.0, 10.0 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len(hook.received) == len(delays) + 1
    assert metrics.attempts.labels(receiver="ops", outcome="failed")._value.get() == 1
    assert metrics.attempts.labels(receiver="ops", outcome="retried")._value.get() == len(delays)


def test_a_hanging_receiver_does_not_delay_ingest_or_enqueueing(store_config, tmp_path, receivers):
    hook = receivers(hang=True)
    config: ServerConfig = parse_server_config(
        {"mqtt": {"port": free_port()}, "store": _store_section(store_config)}, tmp_path)
    store = open_store(store_config)
    notifier = Notifier([receiver_config(tmp_path, hook.port, timeout=30.0)], store)
    ingestor = Ingestor(config, store, ServerMetrics().ingest)
    ingestor.start(connect=False)
    notifier.start()
    try:
        notifier.notify("rollout.started", {"rollout": "r1"})
        assert hook.entered.wait(10.0), "the delivery never reached the receiver"
        # the delivery thread is now blocked inside the receiver: ingest and enqueueing go on
        payload = m.encode(m.online_message("dev-h", True, datetime.now(UTC)))
        assert ingestor.handle_message("fleet/v1/dev-h/online", payload) is None
        assert ingestor.drain(10.0)
        assert store.device("dev-h") is not None
        assert notifier.notify("rollout.halted", {"rollout": "r1"}) == 1
        assert hook.received == []  # the first delivery is still blocked in the receiver
    finally:
        hook.hang.set()
        notifier.stop()
        ingestor.stop()
        store.close()


def _store_section(config: StoreConfig) -> dict[str, Any]:
    if config.backend == "postgresql":
        return {"url": config.url, "password_file": str(config.password_file)}
    return {"path": str(config.path)}


def _event(device: str, kind: str, ts: float, **fields: Any) -> dict[str, Any]:
    return m.event_message(device, type=kind, commit="a" * 40, release=3, ts=ts, **fields)


def test_device_events_and_offline_devices_become_notifications_once(any_store, store_config, tmp_path):
    clock = Clock()
    receiver = receiver_config(tmp_path, free_port(), offline_after=600.0)
    notifier = Notifier([receiver], any_store, clock=clock)
    assert notifier.scan(clock.now) == 0  # the first look starts at the head of the history
    batch = IngestBatch()
    t0 = clock.now
    batch.add("events", _event("dev-1", "sync_refused", t0, reason="release 3 is expired"), t0)
    batch.add("events", _event("dev-2", "drift_detected", t0 + 1,
                               detail={"count": 1, "corrected": False, "resources": ["f"], "mode": "audit"}),
              t0)
    batch.add("events", _event("dev-3", "drift_detected", t0 + 2,
                               detail={"count": 1, "corrected": True, "resources": ["f"], "mode": "enforce"}),
              t0)
    batch.add("events", _event("dev-3", "sync_succeeded", t0 + 3), t0)
    any_store.apply_batch(batch)
    # dev-1 goes offline now, dev-2 650 s later; the receiver wants to hear after 600 s
    sql = (f"UPDATE devices SET online = 0, online_ts = {t0} WHERE id = 'dev-1';"
           f" UPDATE devices SET online = 0, online_ts = {t0 + 650} WHERE id = 'dev-2';")
    run_sql(store_config, sqlite=sql, postgresql=sql)
    clock.now = t0 + 700
    assert notifier.scan(clock.now) == 3
    assert notifier.scan(clock.now) == 0  # the same facts again: nothing new
    rows = sorted(the_rows(any_store), key=lambda r: r["event"])
    assert [r["event"] for r in rows] == ["device.drift_uncorrected", "device.offline",
                                          "device.release_refused"]
    bodies = {r["event"]: json.loads(_body(any_store, store_config, r["id"]))["data"] for r in rows}
    assert bodies["device.release_refused"]["reason"] == "release 3 is expired"
    assert bodies["device.drift_uncorrected"]["device"] == "dev-2"
    assert bodies["device.offline"]["device"] == "dev-1"
    # a restart reads on from the stored cursor: still nothing new
    again = Notifier([receiver], any_store, clock=clock)
    assert again.scan(clock.now) == 0


def _body(store: FleetStore, config: StoreConfig, delivery_id: int) -> str:
    [row] = [r for r in store.due_deliveries(time.time() + 10**6, 1000) if r["id"] == delivery_id]
    return str(row["body"])


def test_passed_gates_become_wave_passed_events_and_failed_ones_do_not():
    found = gate_events([{"rollout_id": "r1", "wave": 0, "at": 5.0, "passed": True, "detail": {}},
                         {"rollout_id": "r1", "wave": 1, "at": 9.0, "passed": False, "detail": {}}])
    assert [(p.event, dict(p.data)) for p in found] == [("rollout.wave_passed", {"rollout": "r1", "wave": 0})]


def test_only_subscribed_receivers_get_an_event(any_store, tmp_path):
    a = Receiver(name="a", url="http://127.0.0.1:9/", events=("rollout.halted",))
    b = Receiver(name="b", url="http://127.0.0.1:9/", events=("device.offline",))
    notifier = Notifier([a, b], any_store)
    assert notifier.notify("rollout.halted", {}) == 1
    assert [r["receiver"] for r in the_rows(any_store)] == ["a"]


def test_the_delivery_log_is_paged_over_http_and_by_fleetctl(tmp_path, any_store, capsys):
    notifier = Notifier([Receiver(name="a", url="http://127.0.0.1:9/", events=("*",))], any_store)
    for i in range(5):
        notifier.notify("device.offline", {"device": f"dev-{i}"})
    app = create_app(any_store, ServerConfig(), ServerMetrics(), actions=ApiActions())
    with serve_app(app) as base:
        answer = httpx.get(f"{base}/api/v1/notifications", params={"limit": 2, "offset": 1}).json()
        assert (answer["total"], len(answer["notifications"]), answer["offset"]) == (5, 2, 1)
        assert all("body" not in n for n in answer["notifications"])
        assert httpx.get(f"{base}/api/v1/notifications", params={"state": "failed"}).json()["total"] == 0
        assert httpx.get(f"{base}/api/v1/notifications", params={"state": "lost"}).status_code == 400
        assert fleetctl.main(["notifications", "list", "--server", base, "--limit", "3"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:4] == ["CREATED", "RECEIVER", "EVENT", "STATE"]
        assert len(out) == 5
        assert out[-1] == "1-3 of 5 notification(s)"
        assert all(" device.offline " in line and " pending " in line for line in out[1:4])


A = {"name": "a", "url": "https://x/", "events": ["*"]}


@pytest.mark.parametrize(("raw", "reason"), [
    ([{"name": "a", "url": "ftp://x/", "events": ["*"]}], "notifications[0].url: must be an http"),
    ([{"name": "a", "url": "https://u:p@x/", "events": ["*"]}], "must not carry credentials"),
    ([{**A, "events": ["rollout.done"]}], "notifications[0].events[0]: unknown event"),
    ([{"name": "a", "url": "https://x/"}], "notifications[0].events: required"),
    ([A, {**A, "url": "https://y/"}], "notifications[1].name: 'a' names another receiver too"),
    ([{**A, "secret": "s"}], "notifications[0].secret: unknown key"),
    ({"name": "a"}, "notifications: must be a list"),
])
def test_bad_notification_settings_are_refused_with_the_field(raw, reason, tmp_path):
    with pytest.raises(ServerConfigError, match=re.escape(reason)):
        parse_notifications(raw, tmp_path)


def test_the_preflight_event_is_accepted_and_durations_parse(tmp_path):
    config = parse_server_config({"notifications": [
        {"name": "a", "url": "https://x/hook", "events": ["rollout.preflight"], "secret_file": "s",
         "timeout": "3s", "retry_for": "2h", "offline_after": "5m"}]}, tmp_path)
    [r] = config.notifications
    assert (r.timeout, r.retry_for, r.offline_after, r.secret_file) == (3.0, 7200.0, 300.0, tmp_path / "s")


def test_an_unreadable_secret_stops_the_notifier_without_showing_it(tmp_path, any_store):
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    with pytest.raises(ServerConfigError, match=r"notifications\[0\]\.secret_file .*: empty"):
        Notifier([Receiver(name="a", url="https://x/", events=("*",), secret_file=empty)], any_store)
    with pytest.raises(ServerConfigError, match="cannot read notifications"):
        Notifier([Receiver(name="a", url="https://x/", events=("*",), secret_file=tmp_path / "none")],
                 any_store)


def test_a_release_the_watcher_refuses_is_notified_once_across_restarts(fleet: Fleet, receivers):
    hook = receivers()
    notifier = Notifier([receiver_config(fleet.tmp, hook.port, events=("release.refused",))], fleet.store)
    fleet.release({"bundles/base/bundle.yaml": "name: base\n"})
    fleet.work.write("bundles/base/bundle.yaml", "name: evil\n")  # changed after signing
    sha = fleet.work.commit("tamper")
    fleet.work.push(fleet.bare)
    for _ in range(2):  # the second watcher is the server after a restart: it judges the head again
        watcher = GitWatcher(fleet.config(), fleet.store, fleet.nudge, notify=notifier.refusal_hook)
        try:
            assert watcher.poll_once().status == "refused"
        finally:
            watcher.stop()
    deliver_all(notifier, time.time)
    assert [(r["note"]["event"], r["note"]["data"]["commit"], r["note"]["data"]["reason"])
            for r in hook.received] == [("release.refused", sha, "tampered")]


def test_a_rollout_sends_started_wave_passed_and_succeeded_once_each(any_store):
    devices = fleet_of(any_store, 3)
    clock = RunnerClock()
    everything = Receiver(name="a", url="http://127.0.0.1:9/", events=("*",))
    notifier = Notifier([everything], any_store, clock=clock)
    phases: list[str] = []
    runner = RolloutRunner(any_store, lambda *_args: None, clock=clock)
    record = both_listeners(lambda state, _old: phases.append(state.phase), notifier.on_phase)
    runner.set_phase_listener(record)
    runner.set_commit_listener(notifier.on_commit)
    runner.load()
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    for _ in range(20):
        clock.now += 1
        runner.tick()
        state = runner.state(rid)
        assert state is not None
        if state.phase == "succeeded":
            break
        if all(state.devices[d].state == "assigned" for d in devices):
            succeeded(any_store, devices, clock.now)
    assert phases[-1] == "succeeded"
    rows = sorted(the_rows(any_store), key=lambda r: r["id"])
    assert [r["event"] for r in rows] == ["rollout.started", "rollout.wave_passed", "rollout.succeeded"]
    runner.tick()  # nothing new happens: nothing new is sent
    assert len(the_rows(any_store)) == 3


def test_settled_deliveries_past_retention_are_pruned_and_pending_ones_kept(any_store, tmp_path, receivers):
    hook = receivers()
    clock = Clock()
    old = clock.now - 10 * 86400
    notifier = Notifier([receiver_config(tmp_path, hook.port)], any_store, clock=clock)
    notifier.notify("device.offline", {"device": "delivered-long-ago"}, at=old)
    deliver_all(notifier, clock)
    hook.status = 500
    notifier.notify("device.offline", {"device": "failed-long-ago"}, at=old)  # past retry_for: given up
    notifier.notify("device.offline", {"device": "pending-now"})  # retried later
    deliver_all(notifier, clock)
    assert sorted(r["state"] for r in the_rows(any_store)) == ["delivered", "failed", "pending"]
    assert any_store.prune_deliveries(clock.now - 86400) == 2
    assert [r["state"] for r in the_rows(any_store)] == ["pending"]


def test_a_device_offline_since_before_the_lookback_at_start_is_not_notified(any_store, store_config,
                                                                              tmp_path):
    clock = Clock()
    receiver = receiver_config(tmp_path, free_port(), offline_after=600.0)
    batch = IngestBatch()
    for device in ("dev-old", "dev-new"):
        batch.add("events", _event(device, "sync_succeeded", clock.now - 5), clock.now - 5)
    any_store.apply_batch(batch)
    long_ago, recent = clock.now - 600 - 2 * 86400, clock.now - 3600
    sql = (f"UPDATE devices SET online = 0, online_ts = {long_ago} WHERE id = 'dev-old';"
           f" UPDATE devices SET online = 0, online_ts = {recent} WHERE id = 'dev-new';")
    run_sql(store_config, sqlite=sql, postgresql=sql)
    notifier = Notifier([receiver], any_store, clock=clock)
    assert notifier.scan(clock.now) == 1
    [row] = the_rows(any_store)
    assert json.loads(_body(any_store, store_config, row["id"]))["data"]["device"] == "dev-new"


def test_a_redirect_is_not_followed_and_the_secret_is_never_logged(any_store, tmp_path, receivers, caplog):
    elsewhere = receivers()
    hook = receivers(status=302)
    original = hook.server.RequestHandlerClass.send_response

    def redirect(handler: BaseHTTPRequestHandler, code: int, message: str | None = None) -> None:
        original(handler, code, message)
        handler.send_header("Location", f"http://127.0.0.1:{elsewhere.port}/stolen")

    hook.server.RequestHandlerClass.send_response = redirect
    notifier = Notifier([receiver_config(tmp_path, hook.port)], any_store)
    with caplog.at_level("DEBUG"):
        notifier.notify("rollout.halted", {"rollout": "r1"})
        deliver_all(notifier, time.time)
    [row] = the_rows(any_store)
    assert (row["state"], row["last_status"]) == ("pending", 302)
    assert row["last_error"] == "127.0.0.1 answered HTTP 302"
    assert len(hook.received) == 1
    assert elsewhere.received == []
    assert "answered HTTP 302" in caplog.text
    assert SECRET.decode() not in caplog.text
    assert SECRET.decode() not in json.dumps(the_rows(any_store))


def test_a_dead_receiver_costs_one_attempt_per_back_off_and_holds_no_other_receiver(any_store, tmp_path,
                                                                                     receivers):
    live = receivers()
    clock = Clock()
    dead = Receiver(name="dead", url=f"http://127.0.0.1:{free_port()}/", events=("*",), timeout=5.0)
    alive = receiver_config(tmp_path, live.port)
    notifier = Notifier([dead, alive], any_store, clock=clock)
    for i in range(5):
        notifier.notify("device.offline", {"device": f"dev-{i}"})
    deliver_all(notifier, clock)
    rows = the_rows(any_store)
    dead_rows = [r for r in rows if r["receiver"] == "dead"]
    assert sum(r["attempts"] for r in dead_rows) == 1
    assert all(r["state"] == "pending" and r["next_attempt"] > clock.now for r in dead_rows)
    assert len({r["next_attempt"] for r in dead_rows}) == 1
    assert [r["state"] for r in rows if r["receiver"] == "ops"] == ["delivered"] * 5
    assert len(live.received) == 5
