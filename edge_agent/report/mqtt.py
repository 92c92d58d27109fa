"""The device's MQTT link: the only module of the project that imports paho.

:class:`MqttLink` keeps one connection to the broker in paho's network thread (``loop_start``):

* client id = device id; a persistent session (MQTT 5: ``clean_start=False`` with a session expiry
  interval of :attr:`MqttSettings.session_expiry` seconds; MQTT 3.1.1: ``clean_session=False``),
  so QoS 1 messages for the device are queued by the broker while it is offline;
* last will ``online=false`` (retained, QoS 1) on ``<prefix>/<device>/online``, and ``online=true``
  published retained on every connect; a clean :meth:`MqttLink.stop` publishes ``online=false``
  itself, because a clean disconnect does not fire the will;
* on every connect it subscribes (QoS 1) to its own ``desired``, ``control`` and ``preflight``
  topics, the broadcast nudge and the retained fleet baseline (``<prefix>/_broadcast/baseline``),
  and hands each valid message to ``on_desired`` / ``on_control`` / ``on_preflight`` /
  ``on_nudge`` / ``on_baseline``. Invalid messages are logged and
  dropped; nothing is ever raised into paho's thread. A retained ``desired`` is delivered again
  after each reconnect, so the callback must tolerate repeats;
* reconnects with capped exponential backoff and *full jitter*. paho's own delay doubles from
  ``min_delay`` without jitter, so before every wait (in ``on_disconnect`` and ``on_connect_fail``,
  which paho calls just before it sleeps) the link draws the next delay from
  :class:`edge_agent.backoff.Backoff` and sets it as both bounds with ``reconnect_delay_set``;
  paho then sleeps exactly that long. A successful CONNACK resets the backoff.

Every paho exception is translated to :class:`BrokerError`. Publishing returns a
:class:`PublishTracking` that completes when the broker acknowledges the message (PUBACK for QoS 1,
PUBCOMP for QoS 2) and carries the acknowledgement's reason code (MQTT 5 brokers may refuse a
publish, e.g. ``Not authorized``, in the acknowledgement itself).

paho's own log lines go to the ``edge_agent.report.mqtt.paho`` logger at paho's level, except that
once :meth:`MqttLink.stop` has begun, paho's "Client is not connected" (its network thread meeting
the socket the clean disconnect just closed) is logged at debug: a clean stop logs nothing above info.
"""

from __future__ import annotations

import logging
import random
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, LogLevel, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.backoff import Backoff
from edge_agent.config import AgentConfig
from edge_core import messages
from edge_core.errors import BrokerError, ConfigError, MessageError
from edge_core.text import one_line
from edge_core.tls import client_context

__all__ = ["MqttLink", "MqttSettings", "PublishTracking", "disconnect_cause", "settings_from_config"]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(__name__ + ".paho")
_NOT_CONNECTED = "Client is not connected"

_PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
_STOP_ONLINE_WAIT = 2.0  # seconds a clean stop waits for the broker to take online=false


@dataclass(frozen=True)
class MqttSettings:
    """How the device reaches the broker; validated on construction.

    Raises:
        ConfigError: an invalid device id, protocol, port, keepalive or reconnect bound.
    """

    host: str
    device_id: str
    port: int = 1883
    prefix: str = "fleet/v1"
    protocol: str = "5"
    keepalive: int = 60
    username: str | None = None
    password: str | None = None
    tls: bool = False  # TLS to the broker; also on whenever a CA file or client certificate is named
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    reconnect_min: float = 1.0
    reconnect_max: float = 120.0
    session_expiry: int = 7 * 24 * 3600
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        try:
            messages.validate_device_id(self.device_id)
            messages.nudge_topic(self.prefix)
        except MessageError as exc:
            raise ConfigError(f"mqtt: {exc}") from exc
        if not self.host:
            raise ConfigError("mqtt.host: must not be empty")
        if self.protocol not in _PROTOCOLS:
            raise ConfigError(f"mqtt.protocol: must be one of {', '.join(_PROTOCOLS)}, got {self.protocol!r}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"mqtt.port: {self.port} is not a TCP port")
        if not 5 <= self.keepalive <= 3600:
            raise ConfigError(f"mqtt.keepalive: {self.keepalive} is not within 5..3600 seconds")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("mqtt: reconnect_min must be positive and not above reconnect_max")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mqtt.tls: cert_file and key_file go together")
        if self.session_expiry < 0 or self.connect_timeout <= 0:
            raise ConfigError("mqtt: session_expiry must be >= 0 and connect_timeout positive")

    @property
    def uses_tls(self) -> bool:
        """Whether the connection is TLS (an ``mqtt.tls`` section, even an empty one)."""
        return self.tls or self.tls_ca is not None or self.tls_cert is not None


def settings_from_config(config: AgentConfig) -> MqttSettings:
    """Build :class:`MqttSettings` from ``agent.yaml`` (reading the password file when one is named).

    Raises:
        ConfigError: there is no ``mqtt`` section, or the password file cannot be read.
    """
    mqtt = config.mqtt
    if mqtt is None:
        raise ConfigError("mqtt: no broker configured")
    password: str | None = None
    if mqtt.password_file is not None:
        try:
            password = mqtt.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {mqtt.password_file}: {exc}") from exc
    tls = mqtt.tls
    return MqttSettings(
        host=mqtt.host, device_id=config.device_id, port=mqtt.port, prefix=mqtt.prefix,
        protocol=mqtt.protocol, keepalive=mqtt.keepalive,
        username=mqtt.username if mqtt.username is not None else (config.device_id if password else None),
        password=password,
        tls=tls is not None, tls_ca=tls.ca_file if tls else None, tls_cert=tls.cert_file if tls else None,
        tls_key=tls.key_file if tls else None,
        reconnect_min=config.backoff.base, reconnect_max=config.backoff.cap,
    )


class PublishTracking:
    """The fate of one publish: done when the broker acknowledged it (or it was lost, for QoS 0).

    ``connection`` is the link's :attr:`MqttLink.connections` when it was published (0 while the
    link had never connected).
    """

    def __init__(self, mid: int, qos: int, connection: int = 0) -> None:
        self.mid = mid
        self.qos = qos
        self.connection = connection
        self._done = threading.Event()
        self._reason: int | None = None
        self._lost = False

    def _complete(self, reason: int) -> None:
        self._reason = reason
        self._done.set()

    def _lose(self) -> None:
        self._lost = True
        self._done.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; return True when the broker has acknowledged the message."""
        self._done.wait(max(0.0, timeout))
        return self.acknowledged

    @property
    def acknowledged(self) -> bool:
        """True once the broker answered (even with a refusal; see :attr:`refused`)."""
        return self._done.is_set() and not self._lost

    @property
    def refused(self) -> bool:
        """True when the broker's acknowledgement carried a failure reason code (>= 0x80)."""
        return self._reason is not None and self._reason >= 0x80

    @property
    def lost(self) -> bool:
        """True for a QoS 0 message that could not be written (no connection)."""
        return self._lost

    @property
    def reason_code(self) -> int | None:
        """The acknowledgement's reason code (0 = success), or None before it arrived."""
        return self._reason


_SESSION_TAKEN_OVER = 0x8E


def disconnect_cause(reason: ReasonCode | None, flags: Any) -> str:
    """Say why the broker connection ended, for the log: paho's own ``Unspecified error`` for a
    closed socket says nothing, and Mosquitto closes the socket without a reason when another
    client connects with the same client id (the device id) and takes the session over."""
    code = int(reason.value) if isinstance(reason, ReasonCode) else None
    if code == _SESSION_TAKEN_OVER:
        return "session taken over: another client connected with this device's id"
    if getattr(flags, "is_disconnect_packet_from_server", False):
        return f"the broker disconnected this device: {reason}"
    return ("closed without a reason: the network or the broker failed, or another client connected "
            "with this device's id and credentials and took its session over")


class MqttLink:
    """One device's connection to the broker; see the module docstring. Start once, stop once.

    Args:
        settings: where and how to connect.
        on_desired: called (in paho's thread) with every valid ``desired`` message for this device.
        on_nudge: called (in paho's thread) with every valid broadcast nudge.
        on_baseline: called (in paho's thread) with every valid fleet baseline.
        on_control: called (in paho's thread) with every valid ``control`` message for this device.
        on_preflight: called (in paho's thread) with every valid ``preflight`` request for this device.
        on_connected: called (in paho's thread) after every successful connect, e.g. to wake the
            outbox sender.
        clock: wall clock (POSIX seconds) for message timestamps.
        rng: the random source of the reconnect jitter.

    Raises:
        BrokerError: the TLS files cannot be loaded or paho refuses the settings.
    """

    def __init__(self, settings: MqttSettings, *, on_desired: Callable[[dict[str, Any]], None] | None = None,
                 on_nudge: Callable[[dict[str, Any]], None] | None = None,
                 on_baseline: Callable[[dict[str, Any]], None] | None = None,
                 on_control: Callable[[dict[str, Any]], None] | None = None,
                 on_preflight: Callable[[dict[str, Any]], None] | None = None,
                 on_connected: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._on_desired = on_desired
        self._on_nudge = on_nudge
        self._on_baseline = on_baseline
        self._on_control = on_control
        self._on_preflight = on_preflight
        self._on_connected = on_connected
        self._clock = clock
        self._backoff = Backoff(base=settings.reconnect_min, cap=settings.reconnect_max, rng=rng)
        self._lock = threading.Lock()
        self._pending: dict[int, PublishTracking] = {}
        self._early: dict[int, int] = {}
        self._started = False
        self._stopped = False
        self._connected = threading.Event()
        self._connections = 0
        self.online_topic = messages.topic(settings.prefix, settings.device_id, "online")
        self.desired_topic = messages.topic(settings.prefix, settings.device_id, "desired")
        self.control_topic = messages.topic(settings.prefix, settings.device_id, "control")
        self.preflight_topic = messages.topic(settings.prefix, settings.device_id, "preflight")
        self.nudge_topic = messages.nudge_topic(settings.prefix)
        self.baseline_topic = messages.baseline_topic(settings.prefix)
        self._client = self._make_client()

    # -- set-up ---------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        try:
            client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=s.device_id,
                clean_session=None if v5 else False, protocol=_PROTOCOLS[s.protocol],
            )
            client.on_log = self._handle_log
            client.connect_timeout = s.connect_timeout
            if s.username is not None:
                client.username_pw_set(s.username, s.password)
            if s.uses_tls:
                # the broker's certificate and host name verified against tls_ca, else the system's
                # trust store with its CAs read on demand (edge_core/tls.py)
                context = client_context(None if s.tls_ca is None else str(s.tls_ca))
                if s.tls_cert is not None:
                    context.load_cert_chain(str(s.tls_cert), None if s.tls_key is None else str(s.tls_key))
                client.tls_set_context(context)
            will = messages.encode(messages.online_message(s.device_id, False, self._clock()))
            client.will_set(self.online_topic, will, qos=1, retain=True)
        except (ValueError, OSError, ssl.SSLError, MessageError) as exc:
            raise BrokerError(f"cannot set up the MQTT client for {s.host}:{s.port}: {exc}") from exc
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        return client

    def _jitter_next_wait(self) -> None:
        """Make paho's next reconnect wait a full-jitter draw (see the module docstring)."""
        delay = self._backoff.next_delay()
        # paho annotates the bounds as int but computes in float seconds; sub-second delays work.
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in paho's network thread; returns at once (see :meth:`wait_connected`).

        Raises:
            BrokerError: already started, or paho refuses to start.
        """
        if self._started:
            raise BrokerError("this MQTT link was already started; create a new one")
        self._started = True
        s = self.settings
        properties: Properties | None = None
        if s.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry
        self._jitter_next_wait()
        try:
            if s.protocol == "5":
                self._client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=False,
                                           properties=properties)
            else:
                self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
            err = self._client.loop_start()
        except (ValueError, OSError) as exc:
            raise BrokerError(f"cannot start the MQTT client for {s.host}:{s.port}: {exc}") from exc
        if err != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot start the MQTT network thread: {paho.error_string(err)}")
        log.info("MQTT link to %s:%s started (client id %s, MQTT %s)", s.host, s.port, s.device_id,
                 s.protocol)

    def stop(self, offline_wait: float = _STOP_ONLINE_WAIT) -> None:
        """Publish ``online=false`` (waiting up to ``offline_wait`` s), disconnect, stop the thread.

        The persistent session stays on the broker. Idempotent; never raises for a broker that
        is already gone.
        """
        if not self._started or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        if self.connected:
            try:
                offline = messages.encode(messages.online_message(self.settings.device_id, False,
                                                                  self._clock()))
                self.publish(self.online_topic, offline, qos=1, retain=True).wait(offline_wait)
            except BrokerError as exc:
                log.warning("could not publish offline before disconnecting: %s", exc)
        try:
            self._client.disconnect()
        except (ValueError, OSError) as exc:  # pragma: no cover - paho raises nothing here today
            log.warning("MQTT disconnect failed: %s", exc)
        self._client.loop_stop()
        self._connected.clear()
        log.info("MQTT link to %s:%s stopped", self.settings.host, self.settings.port)

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection (CONNACK success, not yet lost)."""
        return self._connected.is_set() and self._client.is_connected()

    @property
    def connections(self) -> int:
        """How many times the broker has accepted this link's connection (0 before the first).

        paho sends the messages still unacknowledged from an earlier connection again right after
        it accepted a new one, but only after the connect callbacks ran: a publisher that wants its
        messages in order waits for those acknowledgements before publishing anything new.
        """
        return self._connections

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; return whether it is connected."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._connected.wait(min(remaining, 0.05))
        return True

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishTracking:
        """Queue ``payload`` on ``topic``; return its tracking.

        While disconnected, QoS 1/2 messages wait in paho's memory and go out on reconnect (in
        order); a QoS 0 message is lost (its tracking says :attr:`PublishTracking.lost`).

        Raises:
            BrokerError: invalid topic, QoS or payload, or paho's queue is full.
        """
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, TypeError, OSError) as exc:
            raise BrokerError(f"cannot publish to {topic}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BrokerError(f"cannot publish to {topic}: the client's queue is full")
        tracking = PublishTracking(info.mid, qos, self._connections)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is not None:
                tracking._complete(early)
            elif qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                tracking._lose()
            else:
                self._pending[info.mid] = tracking
        return tracking

    # -- paho callbacks (paho's thread; they never raise) ---------------------------------------

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                        properties: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.settings.host, self.settings.port,
                      reason)
            return
        self._backoff.reset()
        self._connections += 1  # before connected is set: whoever sees it connected sees this count
        self._connected.set()
        log.info("connected to %s:%s (session present: %s)", self.settings.host, self.settings.port,
                 getattr(flags, "session_present", None))
        try:
            online = messages.encode(messages.online_message(self.settings.device_id, True, self._clock()))
            self.publish(self.online_topic, online, qos=1, retain=True)
            err, _ = client.subscribe([(self.desired_topic, 1), (self.nudge_topic, 1),
                                       (self.baseline_topic, 1), (self.control_topic, 1),
                                       (self.preflight_topic, 1)])
            if err != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("subscribing to %s failed: %s", self.desired_topic, paho.error_string(err))
            if self._on_connected is not None:
                self._on_connected()
        except Exception:  # the callback runs in paho's thread: log, never raise
            log.exception("error after connecting to the broker")

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._connected.clear()
        self._jitter_next_wait()
        # paho calls this from the ``except OSError`` around its connect: name what failed (a refused
        # connection, a timeout, a certificate no trusted CA signed)
        cause = sys.exc_info()[1]
        why = f" ({one_line(cause)})" if cause is not None else ""
        log.warning("cannot connect to %s:%s%s; retrying", self.settings.host, self.settings.port, why)

    def _handle_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        severity = paho.LOGGING_LEVEL.get(LogLevel(level), logging.DEBUG)
        if self._stopped and text.startswith(_NOT_CONNECTED):
            severity = logging.DEBUG  # the network thread meeting the socket a clean stop closed
        _paho_log.log(severity, "%s", text)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                           properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopped:
            return
        self._jitter_next_wait()
        if was_connected:
            log.warning("lost the broker connection (%s); reconnecting", disconnect_cause(reason, flags))

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                        properties: Any) -> None:
        code = int(reason.value) if isinstance(reason, ReasonCode) else 0
        with self._lock:
            tracking = self._pending.pop(mid, None)
            if tracking is None:
                self._early[mid] = code
        if tracking is not None:
            tracking._complete(code)
        if code >= 0x80:
            log.warning("broker refused message %s: %s", mid, reason)

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            name = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message with an undecodable topic")
            return
        if name == self.desired_topic:
            kind, callback = "desired", self._on_desired
            device: str | None = self.settings.device_id
        elif name == self.nudge_topic:
            kind, callback, device = "nudge", self._on_nudge, None
        elif name == self.baseline_topic:
            kind, callback, device = messages.BASELINE_KIND, self._on_baseline, None
        elif name == self.control_topic:
            kind, callback, device = "control", self._on_control, self.settings.device_id
        elif name == self.preflight_topic:
            kind, callback, device = "preflight", self._on_preflight, self.settings.device_id
        else:
            log.warning("dropped a message on unexpected topic %s", name)
            return
        if not message.payload:
            log.debug("empty (cleared) %s message ignored", kind)
            return
        try:
            msg = messages.decode(kind, bytes(message.payload), topic_device=device)
        except MessageError as exc:
            log.warning("dropped an invalid %s message on %s: %s", kind, name, exc)
            return
        if callback is None:
            return
        try:
            callback(msg)
        except Exception:  # the callback runs in paho's thread: log, never raise
            log.exception("the %s handler failed", kind)
