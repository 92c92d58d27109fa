"""The fleet server's configuration: a YAML file plus ``--set section.key=value`` overrides, validated
once into frozen dataclasses.

:func:`load_server_config` reads the file (optional: every field has a default), applies the
overrides on top, refuses unknown keys and wrong types with a :class:`ServerConfigError` naming the
field (``ingest.batch_size: ...``), and resolves relative paths against the directory of the config
file (the working directory when there is none). Every field and its default is documented in
``docs/server-config.md``.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_core.config_section import (
    FETCH_LIMIT_KEYS,
    LOG_LEVELS,
    ConfigSection,
    fetch_limit_values,
    located_reason,
)
from edge_core.errors import KeyFileError, YamlError
from edge_core.gitlimits import FetchLimits
from edge_core.messages import MAX_MESSAGE_BYTES
from edge_core.trust.keys import parse_verify_key
from edge_core.yamlsafe import LocatedDoc, YamlSyntaxError, excerpt, load_yaml
from fleet_server.errors import ServerConfigError
from fleet_server.notify.config import Receiver, parse_notifications

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "GitConfig",
    "GitTrust",
    "HttpConfig",
    "IngestConfig",
    "LeaderConfig",
    "MqttConfig",
    "ServerConfig",
    "StoreConfig",
    "TlsConfig",
    "load_server_config",
    "parse_server_config",
    "parse_set_options",
]

DEFAULT_CONFIG_PATH = Path("/etc/fleet-server/server.yaml")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_BODY_BYTES_LIMIT = 64 * 1024 * 1024
MAX_SET_VALUE_BYTES = 64 * 1024
"""Largest value one ``--set section.key=value`` may carry."""
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_INGEST_PROCESSES = 16
"""The most ingest processes ``ingest.processes`` may ask for."""

_SHARE_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class TlsConfig:
    """TLS files for the broker connection."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class MqttConfig:
    """How the server reaches the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password_file: Path | None = None
    client_id: str = "fleet-server"
    protocol: str = "5"
    prefix: str = "fleet/v1"
    tls: TlsConfig | None = None
    keepalive: int = 60
    session_expiry: float = 86400.0
    share_group: str | None = None
    """MQTT 5 shared-subscription group (``$share/<group>/...``): several server processes with the
    same group split the device reports between them. None: a plain subscription."""


@dataclass(frozen=True)
class StoreConfig:
    """Which database the server keeps its state in and how long history is kept (seconds).

    ``url`` is ``sqlite://<path>`` (the default, made from ``path`` when not given) or
    ``postgresql://user@host:port/database``, whose password is read from ``password_file``.
    """

    path: Path = Path("/var/lib/fleet-server/fleet.db")
    events_retention: float = 30 * 86400.0
    health_retention: float = 7 * 86400.0
    prune_interval: float = 3600.0
    url: str = ""
    password_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.url:
            object.__setattr__(self, "url", f"sqlite://{self.path}")

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``, from the URL's scheme."""
        return "sqlite" if self.url.startswith("sqlite://") else "postgresql"


@dataclass(frozen=True)
class IngestConfig:
    """Limits and batching of the MQTT ingest path."""

    max_payload_bytes: int = MAX_MESSAGE_BYTES
    batch_size: int = 1000
    batch_interval: float = 0.1
    unknown_devices: str = "accept"
    queue_size: int = 100000
    max_lag: float = 30.0
    processes: int = 1
    """OS processes that receive and store device reports (0: inside the server process itself).
    With more than one they split the reports through an MQTT 5 shared subscription. When the key is
    absent: 1, or 0 when ``mqtt.username`` is set (a broker that takes the user name as client id,
    as ``fleetctl broker-config`` sets it up, needs one user per connection)."""


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP API's listener and token files (state-changing calls need the admin token)."""

    host: str = "127.0.0.1"
    port: int = 8080
    admin_token_file: Path | None = None
    read_token_file: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body any route accepts (413 past it, refused before it is read)."""
    body_timeout: float = 30.0
    """Longest wait, in seconds, for the next piece of a request body (408 past it)."""


@dataclass(frozen=True)
class GitTrust:
    """The operator public keys (``ed25519:...``) the server verifies releases with, and k of n; with
    ``allowed_signers`` (an OpenSSH allowed-signers file) every head commit must also carry an SSH
    signature by one of its keys, as devices with ``trust.allowed_signers`` require."""

    keys: tuple[str, ...] = ()
    threshold: int = 1
    allowed_signers: Path | None = None


@dataclass(frozen=True)
class GitConfig:
    """The Git mirror the server watches for new signed releases (off when ``url`` is None)."""

    url: str | None = None
    branch: str = "main"
    poll_interval: float = 60.0
    webhook_secret_file: Path | None = None
    trust: GitTrust = field(default_factory=GitTrust)
    cache_dir: Path = Path("/var/cache/fleet-server/git")
    max_object_bytes: int = FetchLimits.max_object_bytes
    max_inflated_bytes: int = FetchLimits.max_inflated_bytes
    max_refs: int = FetchLimits.max_refs
    max_ref_advertisement_bytes: int = FetchLimits.max_ref_advertisement_bytes
    fetch_deadline: float = FetchLimits.fetch_deadline

    @property
    def fetch_limits(self) -> FetchLimits:
        """The bounds every fetch from the mirror runs under (the same as on a device)."""
        return FetchLimits(max_object_bytes=self.max_object_bytes,
                           max_inflated_bytes=self.max_inflated_bytes, max_refs=self.max_refs,
                           max_ref_advertisement_bytes=self.max_ref_advertisement_bytes,
                           fetch_deadline=self.fetch_deadline, key_prefix="git.")


@dataclass(frozen=True)
class LeaderConfig:
    """Leadership among replicas (``leader:``): a follower tries to take the leader lock every
    ``lease`` seconds, and a leader that stops answering PostgreSQL loses it after one lease."""

    lease: float = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """The whole validated fleet-server configuration."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    git: GitConfig = field(default_factory=GitConfig)
    leader: LeaderConfig = field(default_factory=LeaderConfig)
    log_level: str = "info"
    notifications: tuple[Receiver, ...] = ()
    """The webhook receivers (``docs/notifications.md``)."""


class _Section(ConfigSection):
    """Reads from the server's config; refusals raise :class:`ServerConfigError`."""

    error = ServerConfigError
    document = "config"


def _mqtt(top: _Section) -> MqttConfig:
    s = top.section("mqtt", frozenset({"host", "port", "username", "password_file", "client_id", "protocol",
                                       "prefix", "tls", "keepalive", "session_expiry",
                                       "share_group"}))
    tls: TlsConfig | None = None
    if s.raw.get("tls") is not None:
        t = s.section("tls", frozenset({"ca_file", "cert_file", "key_file"}))
        tls = TlsConfig(ca_file=t.path("ca_file"), cert_file=t.path("cert_file"), key_file=t.path("key_file"))
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ServerConfigError("mqtt.tls: cert_file and key_file go together")
    username = s.opt_str("username")
    password_file = s.path("password_file")
    if password_file is not None and username is None:
        raise ServerConfigError("mqtt.password_file: needs mqtt.username")
    return MqttConfig(
        host=s.str_("host", "127.0.0.1"),
        port=s.int_("port", 8883 if tls is not None else 1883, minimum=1, maximum=65535),
        username=username, password_file=password_file,
        client_id=s.str_("client_id", "fleet-server", _CLIENT_ID),
        protocol=s.choice("protocol", "5", ("5",)),
        prefix=s.topic_prefix("prefix", "fleet/v1"), tls=tls,
        keepalive=s.int_("keepalive", 60, minimum=5, maximum=3600),
        session_expiry=s.duration("session_expiry", 86400.0),
        share_group=None if s.raw.get("share_group") is None else s.str_("share_group", "", _SHARE_GROUP),
    )


_PG_SCHEMES = ("postgresql", "postgres")


def _store_url(s: _Section) -> tuple[str, Path]:
    """Read ``store.url`` (or the older ``store.path``): the URL and, for SQLite, the file."""
    default = Path("/var/lib/fleet-server/fleet.db")
    if not s.has("url"):
        path = s.req_path("path", default)
        return f"sqlite://{path}", path
    if s.has("path"):
        raise ServerConfigError("store.path: give store.url or store.path, not both "
                                "(store.path FILE is store.url sqlite://FILE)")
    url = s.req_str("url")
    if url.startswith("sqlite://"):
        if not url[len("sqlite://"):]:
            raise ServerConfigError("store.url: sqlite:// needs a file, as in "
                                    "sqlite:///var/lib/fleet-server/fleet.db")
        path = Path(url[len("sqlite://"):])
        path = path if path.is_absolute() else s.base_dir / path
        return f"sqlite://{path}", path
    try:
        parts = urllib.parse.urlsplit(url)
        has_password = parts.password is not None
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise ServerConfigError(f"store.url: not a valid URL: {exc}") from exc
    if parts.scheme not in _PG_SCHEMES:
        raise ServerConfigError("store.url: must be sqlite://FILE or postgresql://USER@HOST:PORT/DATABASE")
    query = urllib.parse.parse_qs(parts.query)
    if has_password or "password" in query:
        raise ServerConfigError("store.url: must not carry a password (put it in store.password_file)")
    if not parts.hostname or not parts.path.strip("/") or not port_ok:
        raise ServerConfigError("store.url: must be postgresql://USER@HOST:PORT/DATABASE")
    return url, default


def _store(top: _Section) -> StoreConfig:
    s = top.section("store", frozenset({"path", "url", "password_file", "events_retention",
                                        "health_retention", "prune_interval"}))
    url, path = _store_url(s)
    password_file = s.path("password_file")
    if password_file is not None and url.startswith("sqlite://"):
        raise ServerConfigError("store.password_file: only a postgresql:// store.url takes a password")
    return StoreConfig(path=path, url=url, password_file=password_file,
                       events_retention=s.duration("events_retention", 30 * 86400.0),
                       health_retention=s.duration("health_retention", 7 * 86400.0),
                       prune_interval=s.duration("prune_interval", 3600.0))


def _ingest(top: _Section, mqtt: MqttConfig) -> IngestConfig:
    s = top.section("ingest", frozenset({"max_payload_bytes", "batch_size", "batch_interval",
                                         "unknown_devices", "queue_size", "max_lag",
                                         "processes"}))
    interval = s.duration("batch_interval", 0.1)
    if interval > 60:
        raise ServerConfigError("ingest.batch_interval: must be at most 60s")
    return IngestConfig(
        max_payload_bytes=s.size("max_payload_bytes", MAX_MESSAGE_BYTES, minimum=256,
                                 maximum=16 * 1024 * 1024),
        batch_size=s.int_("batch_size", 1000, minimum=1, maximum=100000),
        batch_interval=interval,
        unknown_devices=s.choice("unknown_devices", "accept", ("accept", "refuse")),
        queue_size=s.int_("queue_size", 100000, minimum=1, maximum=10_000_000),
        max_lag=s.duration("max_lag", 30.0),
        processes=s.int_("processes", 1 if mqtt.username is None else 0, minimum=0,
                         maximum=MAX_INGEST_PROCESSES),
    )


def _http(top: _Section) -> HttpConfig:
    s = top.section("http", frozenset({"host", "port", "admin_token_file", "read_token_file",
                                       "max_body_bytes", "body_timeout"}))
    return HttpConfig(host=s.str_("host", "127.0.0.1"), port=s.int_("port", 8080, minimum=0, maximum=65535),
                      admin_token_file=s.path("admin_token_file"), read_token_file=s.path("read_token_file"),
                      max_body_bytes=s.size("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1024,
                                            maximum=MAX_BODY_BYTES_LIMIT),
                      body_timeout=s.duration("body_timeout", 30.0))


def _git(top: _Section) -> GitConfig:
    s = top.section("git", frozenset({"url", "branch", "poll_interval", "webhook_secret_file", "trust",
                                      "cache_dir"}) | FETCH_LIMIT_KEYS)
    url = s.mirror_url("url")
    branch = s.branch("branch", "main")
    t = s.section("trust", frozenset({"keys", "threshold", "allowed_signers"}))
    keys = t.raw.get("keys")
    if keys is None:
        keys = []
    if not isinstance(keys, list):
        raise ServerConfigError("git.trust.keys: must be a list of ed25519:... public keys")
    for i, k in enumerate(keys):
        try:
            parse_verify_key(k)
        except KeyFileError as exc:
            raise ServerConfigError(f"git.trust.keys[{i}]: {exc}") from exc
    unique = tuple(dict.fromkeys(str(k) for k in keys))
    if url is not None and not unique:
        raise ServerConfigError("git.trust.keys: required when git.url is set")
    threshold = t.int_("threshold", 1, minimum=1, maximum=max(1, len(unique)))
    return GitConfig(url=url, branch=branch, poll_interval=s.duration("poll_interval", 60.0),
                     webhook_secret_file=s.path("webhook_secret_file"),
                     trust=GitTrust(keys=unique, threshold=threshold,
                                    allowed_signers=t.path("allowed_signers")),
                     cache_dir=s.req_path("cache_dir", Path("/var/cache/fleet-server/git")),
                     **fetch_limit_values(s))


_TOP_KEYS = frozenset({"mqtt", "store", "ingest", "http", "git", "leader", "log_level", "notifications"})



def _leader(top: _Section) -> LeaderConfig:
    s = top.section("leader", frozenset({"lease"}))
    lease = s.duration("lease", 5.0)
    if not 1.0 <= lease <= 60.0:
        raise ServerConfigError("leader.lease: must be between 1s and 60s")
    return LeaderConfig(lease=lease)


def parse_server_config(raw: object, base_dir: Path) -> ServerConfig:
    """Validate an already-parsed configuration value; relative paths resolve against ``base_dir``.

    Raises:
        ServerConfigError: naming the first invalid field and why.
    """
    top = _Section(raw, "", _TOP_KEYS, base_dir)
    mqtt = _mqtt(top)
    return ServerConfig(mqtt=mqtt, store=_store(top), ingest=_ingest(top, mqtt), http=_http(top),
                        git=_git(top), leader=_leader(top),
                        log_level=top.choice("log_level", "info", LOG_LEVELS),
                        notifications=parse_notifications(top.raw.get("notifications"), base_dir))


def _apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise ServerConfigError(f"--set {excerpt(dotted)!r}: must be section.key=value")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ServerConfigError(f"{excerpt('.'.join(parts[:i + 1]))}: must be a mapping")
        node = child
    node[parts[-1]] = value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def load_server_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Read ``path`` (None: defaults only), apply the ``section.key`` -> value ``overrides`` and validate.

    Raises:
        ServerConfigError: the file is unreadable or not YAML, or a field is invalid (named).
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    doc: LocatedDoc | None = None
    if path is not None:
        path = Path(path)
        doc = _Section.read_located(path)
        if doc.value is not None and not isinstance(doc.value, Mapping):
            raise ServerConfigError(f"{path}: must be a mapping of sections")
        raw = _thaw(doc.value or {})
        base = path.resolve().parent
    for dotted, value in (overrides or {}).items():
        _apply_override(raw, dotted, value)
    try:
        return parse_server_config(raw, base)
    except ServerConfigError as exc:
        named = str(exc).partition(": ")[0]
        from_set = any(named == k or named.startswith(k + ".") for k in overrides or {})
        if path is None or doc is None or from_set:
            raise
        raise ServerConfigError(located_reason(str(exc), path, doc)) from exc


def parse_set_options(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``--set section.key=value`` strings into overrides; each value is read as a YAML scalar
    or list (``1884`` is a number, ``true`` a boolean, ``[a, b]`` a list, anything else text) by the
    same safe loader as the config file.

    Raises:
        ServerConfigError: an item has no ``=`` or an empty key, or its value uses a refused YAML
            feature (anchors, aliases, tags, duplicate keys, deep nesting) or is over 64 KiB.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ServerConfigError(f"--set {excerpt(item)!r}: must be section.key=value")
        try:
            value = load_yaml(text.encode("utf-8", "surrogateescape"), name=f"--set {excerpt(key)}",
                              max_bytes=MAX_SET_VALUE_BYTES).value if text.strip() else None
        except YamlSyntaxError:
            value = text
        except YamlError as exc:
            raise ServerConfigError(f"--set {excerpt(key)}: {exc.reason.partition(': ')[2]}") from exc
        if isinstance(value, Mapping):
            value = text
        out[key] = value
    return out
