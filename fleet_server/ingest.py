"""MQTT ingest: the fleet server's paho client. Device reports in, ``desired`` and nudges out.

With ``ingest.processes`` ≥ 1 each ingest process (``ingest_process.py``) runs one receiving
:class:`Ingestor` and the server process a publish-only one (``subscribe=False``); with 0 the server
process runs one that does both.

Receive path, built so that a crash loses nothing the broker was told we have::

    broker ─► paho network thread: on_message ─► handle_message (topic split, size cap,
              messages.decode, unknown-device policy) ─► bounded queue ─► writer thread:
              IngestBatch ─► Store.apply_batch (one transaction) ─► PUBACK each message

* MQTT 5, ``clean_start=False`` and a session expiry: while the server is down the broker queues
  the QoS 1 messages of its subscriptions, and delivers them when it comes back.
* Manual acknowledgement (paho ``manual_ack=True`` + ``Client.ack``): a QoS 1 message is
  acknowledged only after the batch holding it is committed to SQLite. A message received but not
  committed when the server dies is redelivered by the broker. Acks are sent in receive order
  (dropped messages travel through the queue too, as markers). Acks are only sent on the connection
  that received the message: after a reconnect the broker redelivers what was not acknowledged, and
  the store ignores the duplicates (events and health samples are unique by device, time and type).
* The broker must allow many unacknowledged messages in flight to the server (Mosquitto:
  ``max_inflight_messages``, default 20): the writer commits early when the queue runs dry, so a
  small window still works, only slower. See ``docs/server-config.md``.
* With ``mqtt.share_group`` the subscriptions are MQTT 5 shared ones (``$share/<group>/...``): the
  broker splits the reports between every server process of the group (each with its own client
  id). Retained messages are never sent to a shared subscription, so each process also keeps a
  plain subscription to the retained kinds (``status``, ``online``) marked with the subscription
  identifier :data:`RETAINED_SUBSCRIPTION`: it takes the retained copies from there and the live
  reports from the shared one, and acknowledges the other copies without storing them. The store
  writes a status or event only over an older one (``fleet_server.store.records.GUARDS``), so a
  retained copy or a report another process committed late never hides a newer one.
* Subscriptions use retain handling 1: retained ``status``/``online`` messages are sent again only
  when the subscription is new (a fresh session), not on every reconnect.
* Falling behind is visible: :meth:`Ingestor.backlog_age` is the age of the oldest message received
  and not yet committed (``fleet_ingest_backlog_age_seconds``, and ``/healthz`` says ``degraded``
  past ``ingest.max_lag``), ``fleet_ingest_commit_delay_seconds`` the receipt-to-commit time of the
  last batch, and ``fleet_broker_connected`` whether the client is connected.
* The receive path never takes the rollout runner's lock: the network thread only decodes and
  queues, and the runner learns of reports by reading the store (see ``rollouts/runner.py``).
* Drops are counted by reason (:data:`fleet_server.metrics.DROP_REASONS`) in the metrics at once and
  in the store's persistent counters with the next batch. Nothing a device sends can raise out of
  the callback.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_core.errors import MessageError
from edge_core.messages import (
    baseline_message,
    baseline_topic,
    control_message,
    decode,
    desired_message,
    encode,
    nudge_message,
    nudge_topic,
    parse_topic,
    topic,
)
from edge_core.preflight_messages import preflight_message
from fleet_server.config import ServerConfig
from fleet_server.errors import BrokerError, StoreError, StoreRefused
from fleet_server.metrics import IngestMetrics
from fleet_server.store import INGEST_KINDS, IngestBatch, IngestStore, to_epoch

__all__ = ["Ingestor"]

log = logging.getLogger(__name__)

_IDLE_FLUSH = 0.005  # commit when nothing more arrived for this long (keeps a small in-flight window moving)
_RETRY_PAUSE = 1.0
_NEGATIVE_CACHE = 30.0


RETAINED_SUBSCRIPTION = 1
"""The MQTT 5 subscription identifier of the plain subscription to the retained topics (with a
shared subscription only)."""
RETAINED_KINDS = ("status", "online")
"""The report kinds devices publish retained."""
SUBSCRIBED_KINDS = (*INGEST_KINDS, "plan")
"""The report kinds the server subscribes to: the stored kinds and a preflight's ``plan``."""
PREFLIGHT_EVENT = "preflight"
"""The event type a device's ``plan`` report is stored as (docs/rollouts.md)."""


def plan_as_event(msg: dict[str, Any]) -> dict[str, Any]:
    """A decoded ``plan`` report as the ``events`` row it is stored as: type :data:`PREFLIGHT_EVENT`,
    its reason, and the rest (rollout id, outcome, changes per kind, prune, drift), which the store
    keeps in the row's ``detail``."""
    event = {"schema": msg["schema"], "ts": msg["ts"], "device": msg["device"], "type": PREFLIGHT_EVENT,
             "commit": msg.get("commit"), "release": msg.get("release"), "reason": msg.get("reason"),
             "step": None}
    return {**event, **{k: msg[k] for k in ("rollout_id", "outcome", "changes", "prune", "drift")}}


def _through_retained_subscription(msg: mqtt.MQTTMessage) -> bool:
    """Whether ``msg`` came through the plain subscription to the retained topics."""
    ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties is not None else None
    return isinstance(ids, list) and RETAINED_SUBSCRIPTION in ids


@dataclass(frozen=True)
class _Item:
    """One received message on its way to the writer: decoded, or a drop marker (``drop`` set).
    ``ts`` is the message's own time in POSIX seconds, or ``received_at`` when it has none."""

    kind: str
    message: dict[str, Any] | None
    drop: str | None
    mid: int
    qos: int
    generation: int
    received_at: float
    ts: float


class Ingestor:
    """Subscribes to every device's reports, writes them to the store in batches, publishes
    ``desired`` assignments and nudges. One instance per server; thread-safe public methods.

    Args:
        config: the server configuration (``mqtt`` and ``ingest`` sections are used).
        store: where batches are committed.
        metrics: ingest collectors (counts, lag, batch sizes, queue depth).
        clock: returns POSIX time (received_at stamps); injected for tests.
        client_id: the MQTT client id (default ``mqtt.client_id``).
        share_group: the shared-subscription group (default ``mqtt.share_group``).
        subscribe: False for a publish-only client (the server process when ingest runs in its own
            processes): it subscribes to nothing and does not bind itself to ``metrics``.
    """

    def __init__(self, config: ServerConfig, store: IngestStore, metrics: IngestMetrics, *,
                 clock: Callable[[], float] = time.time, client_id: str | None = None,
                 share_group: str | None = None, subscribe: bool = True) -> None:
        self._config = config
        self._mqtt = dataclasses.replace(
            config.mqtt, client_id=client_id or config.mqtt.client_id,
            share_group=share_group if share_group is not None else config.mqtt.share_group)
        self._subscribe = subscribe
        self._ingest = config.ingest
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=self._ingest.queue_size)
        self._generation = 0
        self._state_lock = threading.Lock()
        self._accepting = threading.Event()
        self._connected = threading.Event()
        self._writer_stop = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._pending = 0  # messages queued or in the writer, not yet committed (guarded by _idle)
        self._taken_since: float | None = None  # receipt of the oldest message the writer holds
        self._writer: threading.Thread | None = None
        self._known: set[str] = set()
        self._unknown_until: dict[str, float] = {}
        self._client = self._make_client()

    # --- the paho client -------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        m = self._mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)
        if m.username is not None:
            password: str | None = None
            if m.password_file is not None:
                try:
                    password = m.password_file.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise BrokerError(f"cannot read mqtt.password_file {m.password_file}: "
                                      f"{exc.strerror or exc}") from exc
            client.username_pw_set(m.username, password)
        if m.tls is not None:
            try:
                client.tls_set(ca_certs=str(m.tls.ca_file) if m.tls.ca_file else None,
                               certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
                               keyfile=str(m.tls.key_file) if m.tls.key_file else None)
            except (OSError, ValueError) as exc:
                raise BrokerError(f"cannot set up TLS for the broker: {exc}") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection: %s", reason)
            return
        with self._state_lock:
            self._generation += 1
        if self._subscribe:
            prefix = self._mqtt.prefix
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            share = f"$share/{self._mqtt.share_group}/" if self._mqtt.share_group else ""
            client.subscribe([(f"{share}{prefix}/+/{kind}", options) for kind in SUBSCRIBED_KINDS])
            if share:  # retained messages never reach a shared subscription: a plain one, marked
                props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                props.SubscriptionIdentifier = RETAINED_SUBSCRIPTION
                client.subscribe([(f"{prefix}/+/{kind}", options) for kind in RETAINED_KINDS],
                                 properties=props)
        self._connected.set()
        log.info("connected to the broker %s:%s (session present: %s)", self._mqtt.host, self._mqtt.port,
                 getattr(flags, "session_present", None))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if self._accepting.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting.is_set():
            return  # stopping: not acknowledged, so the broker delivers it again after the restart
        try:
            if self._mqtt.share_group and msg.retain != _through_retained_subscription(msg):
                # a live report through the plain subscription (the shared one brings it to one
                # replica), or a retained copy through the shared one (some brokers send them)
                self._pass(msg.mid, msg.qos)
                return
            self.handle_message(msg.topic, bytes(msg.payload), mid=msg.mid, qos=msg.qos)
        except Exception:  # the network thread must survive anything a device sends
            log.exception("unexpected failure ingesting a message on %r", msg.topic[:200])

    # --- the receive path ------------------------------------------------------------------------

    def handle_message(self, topic_name: str, payload: bytes, *, mid: int = 0, qos: int = 0,
                       received_at: float | None = None) -> str | None:
        """Classify one received message and queue it for the writer; return the drop reason, or
        None when it was queued for the store. Never raises for bad input."""
        now = self._clock() if received_at is None else received_at
        with self._state_lock:
            generation = self._generation
        kind = "unknown"
        message: dict[str, Any] | None = None
        drop: str | None = None
        parsed = parse_topic(self._mqtt.prefix, topic_name)
        device = parsed[0] if parsed is not None else None
        if parsed is None or device is None or parsed[1] not in SUBSCRIBED_KINDS:
            drop = "bad_field"
        else:
            kind = parsed[1]
            try:
                message = decode(kind, payload, topic_device=device,
                                 max_bytes=self._ingest.max_payload_bytes)
            except MessageError as exc:
                drop = exc.reason
            else:
                if kind == "plan":  # a preflight's answer is kept with the device's events
                    kind, message = "events", plan_as_event(message)
                if self._ingest.unknown_devices == "refuse" and not self._is_known(device, now):
                    drop, message = "unknown_device", None
        ts: float | None = None
        if drop is not None:
            self._metrics.dropped(drop)
        elif message is not None:
            ts = to_epoch(message.get("ts"))
            if ts is not None:
                self._metrics.observe_lag(now - ts)
        return self._enqueue(_Item(kind, message, drop, mid, qos, generation, now, now if ts is None else ts))

    def _pass(self, mid: int, qos: int) -> None:
        """Acknowledge a message without storing it, in its turn (acknowledgements keep receipt order)."""
        now = self._clock()
        with self._state_lock:
            generation = self._generation
        self._enqueue(_Item("passed", None, None, mid, qos, generation, now, now))

    def _enqueue(self, item: _Item) -> str | None:
        """Queue ``item`` for the writer; return its drop reason (``queue_full`` when the queue is)."""
        drop = item.drop
        with self._idle:
            self._pending += 1  # counted before the writer can see it, so drain() never misses it
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._settled(1)
            if drop is None and item.message is not None:
                self._metrics.dropped("queue_full")
                drop = "queue_full"
            self._ack(item.mid, item.qos, item.generation)  # dropped and counted: nothing left to keep it for
        return drop

    def _is_known(self, device: str, now: float) -> bool:
        if device in self._known:
            return True
        if self._unknown_until.get(device, 0.0) > now:
            return False
        try:
            known = self._store.known_device(device)
        except StoreError as exc:
            log.warning("cannot check device %s: %s", device, exc)
            return False
        if known:
            self._known.add(device)
            self._unknown_until.pop(device, None)
        else:
            if len(self._unknown_until) > 100_000:
                self._unknown_until.clear()
            self._unknown_until[device] = now + _NEGATIVE_CACHE
        return known

    # --- the writer ------------------------------------------------------------------------------

    def _collect(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        self._taken_since = first.received_at
        items = [first]
        deadline = time.monotonic() + self._ingest.batch_interval
        while len(items) < self._ingest.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(self._queue.get(timeout=min(remaining, _IDLE_FLUSH)))
            except queue.Empty:
                break
        return items

    def _write(self, items: list[_Item]) -> bool:
        """Commit one batch; on success acknowledge its messages and count them. False when the store
        cannot be written (retried later); a message the store refuses is dropped and counted; any
        other exception is a bug and propagates."""
        batch = IngestBatch()
        ingested: dict[str, int] = {}
        for it in items:
            if it.drop is not None:
                batch.count(f"dropped.{it.drop}")
            elif it.message is not None:
                batch.add(it.kind, it.message, it.received_at, it.ts)
                ingested[it.kind] = ingested.get(it.kind, 0) + 1
        for kind, n in ingested.items():
            batch.count(f"ingested.{kind}", n)
        try:
            self._store.apply_batch(batch)
        except StoreRefused as exc:  # a message the store cannot take: find it, drop it, go on
            if len(items) > 1:
                return all([self._write([it]) for it in items])
            log.warning("dropping a %s message the store refuses: %s", items[0].kind, exc)
            self._metrics.dropped("store_refused")
            return self._write([dataclasses.replace(items[0], message=None, drop="store_refused")])
        except StoreError as exc:
            log.error("cannot store a batch of %s messages (will retry, not acknowledged): %s",
                      len(items), exc)
            return False
        for kind, n in ingested.items():
            self._metrics.ingested(kind, n)
        self._metrics.observe_batch(len(batch))
        self._metrics.observe_commit_delay(self._clock() - min(it.received_at for it in items))
        with self._state_lock:
            generation = self._generation
        for it in items:
            self._ack(it.mid, it.qos, generation, it.generation)
        return True

    def _ack(self, mid: int, qos: int, current: int, received_on: int | None = None) -> None:
        if qos <= 0 or (received_on is not None and received_on != current) or not self._connected.is_set():
            return
        self._client.ack(mid, qos)

    def _writer_main(self) -> None:
        while True:
            items = self._collect()
            if not items:
                if self._writer_stop.is_set() and self._queue.empty():
                    return
                continue
            while not self._write_or_report(items):
                if self._writer_stop.wait(_RETRY_PAUSE):
                    log.error("stopping with %s messages not stored; the broker keeps them", len(items))
                    self._settled(len(items) + self._discard_queue())
                    return
            self._metrics.set_queue_depth(self._queue.qsize())
            self._taken_since = None
            self._settled(len(items))

    def _write_or_report(self, items: list[_Item]) -> bool:
        """:meth:`_write`, reporting a failure that is not the store's (a bug of the write path) with
        its traceback and returning False: its messages stay unacknowledged, the writer retries them,
        and the backlog age shows the stall; a bug is never counted as a refused message."""
        try:
            return self._write(items)
        except Exception:
            log.exception("the ingest writer failed on a batch of %s messages (not acknowledged, retried)",
                          len(items))
            return False

    def _settled(self, n: int) -> None:
        """Mark ``n`` accepted messages as no longer pending; wake drain() when none are left."""
        with self._idle:
            self._pending -= n
            if self._pending <= 0:
                self._idle.notify_all()

    def _discard_queue(self) -> int:
        discarded = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return discarded
            discarded += 1

    def backlog_age(self) -> float:
        """Return how long the oldest message received and not yet committed has waited, in seconds
        (0 when every received message is committed)."""
        oldest = self._taken_since
        with self._queue.mutex:  # the queue is FIFO: its head is the oldest message not yet taken
            head = self._queue.queue[0].received_at if self._queue.queue else None
        if oldest is None or (head is not None and head < oldest):
            oldest = head
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every queued message is committed; return whether that happened."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, *, connect: bool = True) -> None:
        """Start the writer thread and (with ``connect``) the broker connection, which paho keeps
        retrying in the background. Call at most once.

        Raises:
            BrokerError: the broker address cannot be used at all.
        """
        try:
            self._known = self._store.known_devices() if self._ingest.unknown_devices == "refuse" else set()
        except StoreError as exc:
            log.warning("cannot preload known devices: %s", exc)
        self._writer = threading.Thread(target=self._writer_main, name="ingest-writer", daemon=True)
        self._writer.start()
        if self._subscribe:
            self._metrics.bind(self)
        self._accepting.set()
        if not connect:
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = int(self._mqtt.session_expiry)
        props.ReceiveMaximum = 65535
        try:
            self._client.connect_async(self._mqtt.host, self._mqtt.port, keepalive=self._mqtt.keepalive,
                                       clean_start=False, properties=props)
        except (OSError, ValueError) as exc:
            where = f"{self._mqtt.host}:{self._mqtt.port}"
            raise BrokerError(f"cannot connect to the broker {where}: {exc}") from exc
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait (bounded) until the broker connection is up and subscribed; return whether it is."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        return self._connected.is_set()

    def problems(self) -> list[str]:
        """Reasons the ingest path is unhealthy besides the broker link and the lag (none in process)."""
        return []

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet handed to the store."""
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, commit and acknowledge what is queued (bounded by ``timeout``),
        then disconnect. Idempotent. Messages not committed stay unacknowledged at the broker."""
        self._accepting.clear()
        if self._writer is not None:
            self.drain(timeout)
            self._writer_stop.set()
            self._writer.join(timeout=max(1.0, timeout))
            self._writer = None
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # --- publishing ------------------------------------------------------------------------------

    def _publish(self, topic_name: str, payload: bytes, *, retain: bool, wait: float) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic_name, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"cannot publish to {topic_name}: {mqtt.error_string(info.rc)}")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            log.info("broker not connected; %s is queued until it is", topic_name)
        if wait > 0:
            try:
                info.wait_for_publish(wait)
            except RuntimeError as exc:
                raise BrokerError(f"cannot publish to {topic_name}: {exc}") from exc
            if not info.is_published():
                raise BrokerError(f"the broker did not acknowledge {topic_name} within {wait}s")
        return info

    def publish_desired(self, device_id: str, revision: str, release: int, rollout_id: str | None, *,
                        wait: float = 0.0) -> mqtt.MQTTMessageInfo:
        """Publish the retained QoS 1 ``desired`` assignment of one device (waiting up to ``wait``
        seconds for the broker's acknowledgement when positive); return the message's handle, which
        tells when the broker acknowledged it.

        Raises:
            MessageError: a field is invalid.
            BrokerError: the message cannot be queued, or was not acknowledged in time.
        """
        msg = desired_message(device_id, revision=revision, release=release, rollout_id=rollout_id,
                              ts=self._clock())
        desired_topic = topic(self._mqtt.prefix, device_id, "desired")
        return self._publish(desired_topic, encode(msg), retain=True, wait=wait)

    def publish_control(self, device_id: str, *, paused: bool, reason: str | None, wait: float = 0.0) -> None:
        """Publish the retained QoS 1 ``control`` message of one device: the fleet server's remote pause
        (``paused``, with the operator's ``reason``) or its lifting.

        Raises:
            MessageError: a field is invalid.
            BrokerError: the message cannot be queued, or was not acknowledged in time.
        """
        msg = control_message(device_id, paused=paused, reason=reason, ts=self._clock())
        self._publish(topic(self._mqtt.prefix, device_id, "control"), encode(msg), retain=True, wait=wait)

    def publish_preflight(self, device_id: str, revision: str, release: int, rollout_id: str) -> None:
        """Publish the retained QoS 1 ``preflight`` request of one device (its time stamps the request,
        so a new one is answered even for the same rollout).

        Raises:
            MessageError: a field is invalid.
            BrokerError: the message cannot be queued.
        """
        msg = preflight_message(device_id, revision=revision, release=release, rollout_id=rollout_id,
                                ts=self._clock())
        self._publish(topic(self._mqtt.prefix, device_id, "preflight"), encode(msg), retain=True, wait=0.0)

    def publish_nudge(self, revision: str, release: int, *, wait: float = 0.0) -> None:
        """Broadcast a QoS 1 nudge: a new release exists, devices fetch now.

        Raises:
            MessageError: a field is invalid.
            BrokerError: the message cannot be queued, or was not acknowledged in time.
        """
        msg = nudge_message(revision=revision, release=release, ts=self._clock())
        self._publish(nudge_topic(self._mqtt.prefix), encode(msg), retain=False, wait=wait)

    def publish_baseline(self, revision: str, release: int, *, wait: float = 0.0) -> None:
        """Publish the retained QoS 1 fleet baseline: the last-good release every device without an
        assignment runs (``<prefix>/_broadcast/baseline``).

        Raises:
            MessageError: a field is invalid.
            BrokerError: the message cannot be queued, or was not acknowledged in time.
        """
        msg = baseline_message(revision=revision, release=release, ts=self._clock())
        self._publish(baseline_topic(self._mqtt.prefix), encode(msg), retain=True, wait=wait)
