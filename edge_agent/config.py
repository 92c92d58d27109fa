"""``agent.yaml``: the device agent's configuration as frozen dataclasses, validated once.

:func:`load_config` reads the file, refuses unknown keys and wrong types with a :class:`ConfigError`
naming the field (``repo.auth.token_file: ...``), fills in defaults, and resolves relative paths
against the directory of the config file. Every field and its default is documented in
``docs/agent-config.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_core.config_section import (
    FETCH_LIMIT_KEYS,
    LOG_LEVELS,
    ConfigSection,
    fetch_limit_values,
    located_reason,
    parse_duration,
)
from edge_core.errors import ConfigError, KeyFileError
from edge_core.gitlimits import FetchLimits
from edge_core.messages import MAX_LABEL_VALUE, MAX_LABELS
from edge_core.trust.keys import parse_verify_key
from edge_core.yamlsafe import excerpt

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PROFILE_DIRS",
    "AgentConfig",
    "BackoffConfig",
    "Intervals",
    "MqttConfig",
    "MqttTls",
    "RepoAuth",
    "RepoConfig",
    "TrustConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")
DEFAULT_PROFILE_DIRS = (Path("/etc/edge-agent/profiles"), Path("/usr/share/edge-agent/profiles"))
_DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")


@dataclass(frozen=True)
class RepoAuth:
    """Credentials for the Git mirror; secrets are named by file, never inline."""

    token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    ssh_key: Path | None = None
    ssh_known_hosts: Path | None = None


@dataclass(frozen=True)
class RepoConfig:
    """Where the signed config repository is fetched from."""

    url: str
    branch: str = "main"
    auth: RepoAuth = field(default_factory=RepoAuth)
    max_fetch_bytes: int = 256 * 1024 * 1024
    timeout: float = 30.0
    max_object_bytes: int = FetchLimits.max_object_bytes
    max_inflated_bytes: int = FetchLimits.max_inflated_bytes
    max_refs: int = FetchLimits.max_refs
    max_ref_advertisement_bytes: int = FetchLimits.max_ref_advertisement_bytes
    fetch_deadline: float = FetchLimits.fetch_deadline

    @property
    def fetch_limits(self) -> FetchLimits:
        """The bounds every fetch from this mirror runs under."""
        return FetchLimits(max_object_bytes=self.max_object_bytes,
                           max_inflated_bytes=self.max_inflated_bytes, max_refs=self.max_refs,
                           max_ref_advertisement_bytes=self.max_ref_advertisement_bytes,
                           fetch_deadline=self.fetch_deadline, key_prefix="repo.")


@dataclass(frozen=True)
class TrustConfig:
    """The initial trust root: operator public keys (``ed25519:...``) and how many must sign."""

    keys: tuple[str, ...]
    threshold: int = 1
    allowed_signers: Path | None = None


@dataclass(frozen=True)
class MqttTls:
    """TLS files for the broker connection."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class MqttConfig:
    """How the agent reaches the MQTT broker (used by the reporting module)."""

    host: str
    port: int = 1883
    tls: MqttTls | None = None
    username: str | None = None
    password_file: Path | None = None
    protocol: str = "5"
    prefix: str = "fleet/v1"
    keepalive: int = 60


@dataclass(frozen=True)
class Intervals:
    """Seconds between syncs, drift checks and health reports."""

    poll: float = 300.0
    drift: float = 60.0
    health: float = 60.0


@dataclass(frozen=True)
class BackoffConfig:
    """Capped exponential backoff (seconds) for fetch and broker retries."""

    base: float = 1.0
    cap: float = 300.0


@dataclass(frozen=True)
class AgentConfig:
    """The whole validated ``agent.yaml``."""

    device_id: str
    repo: RepoConfig
    trust: TrustConfig
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: str = "generic-linux"
    profile_dirs: tuple[Path, ...] = DEFAULT_PROFILE_DIRS
    mqtt: MqttConfig | None = None
    mode: str = "enforce"
    intervals: Intervals = field(default_factory=Intervals)
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    root: Path = Path("/")
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: str = "info"

    @property
    def mqtt_prefix(self) -> str:
        """The topic prefix for reports (``fleet/v1`` when no mqtt section is configured)."""
        return self.mqtt.prefix if self.mqtt is not None else "fleet/v1"


class _Section(ConfigSection):
    """Reads from agent.yaml; refusals raise :class:`ConfigError`."""

    error = ConfigError
    document = "agent.yaml"


def _labels(top: _Section) -> dict[str, str]:
    raw = top.raw.get("labels")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError("labels: must be a mapping of name to value")
    if len(raw) > MAX_LABELS:
        raise ConfigError(f"labels: at most {MAX_LABELS} labels (they travel in every status report)")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            raise ConfigError(f"labels.{excerpt(str(k))}: invalid label name")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(f"labels.{k}: value must be a string")
        out[k] = str(v)
        if len(out[k]) > MAX_LABEL_VALUE:
            raise ConfigError(f"labels.{k}: value longer than {MAX_LABEL_VALUE} characters")
    return out


def _profile_dirs(top: _Section) -> tuple[Path, ...]:
    raw = top.raw.get("profile_dirs")
    if raw is None:
        return DEFAULT_PROFILE_DIRS
    if not isinstance(raw, list) or not raw or not all(isinstance(p, str) and p for p in raw):
        raise ConfigError("profile_dirs: must be a non-empty list of directories")
    return tuple(p if p.is_absolute() else top.base_dir / p for p in (Path(s).expanduser() for s in raw))


def _repo(top: _Section) -> RepoConfig:
    if not top.has("repo"):
        raise ConfigError("repo: is required")
    s = top.section("repo", frozenset({"url", "branch", "auth", "max_fetch_bytes", "timeout"})
                    | FETCH_LIMIT_KEYS)
    url = s.mirror_url("url")
    if url is None:
        raise ConfigError("repo.url: is required")
    branch = s.branch("branch", "main")
    auth_keys = frozenset({"token_file", "username", "password_file", "ssh_key", "ssh_known_hosts"})
    a = s.section("auth", auth_keys)
    auth = RepoAuth(token_file=a.path("token_file"), username=a.opt_str("username"),
                    password_file=a.path("password_file"), ssh_key=a.path("ssh_key"),
                    ssh_known_hosts=a.path("ssh_known_hosts"))
    if auth.token_file is not None and auth.password_file is not None:
        raise ConfigError("repo.auth: give token_file or password_file, not both")
    return RepoConfig(url=url, branch=branch, auth=auth,
                      max_fetch_bytes=s.size("max_fetch_bytes", 256 * 1024 * 1024),
                      timeout=s.duration("timeout", 30.0),
                      **fetch_limit_values(s))


def _trust(top: _Section) -> TrustConfig:
    if not top.has("trust"):
        raise ConfigError("trust: is required")
    s = top.section("trust", frozenset({"keys", "threshold", "allowed_signers"}))
    keys = s.raw.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ConfigError("trust.keys: must be a non-empty list of ed25519:... public keys")
    for i, k in enumerate(keys):
        try:
            parse_verify_key(k)
        except KeyFileError as exc:
            raise ConfigError(f"trust.keys[{i}]: {exc}") from exc
    unique = tuple(dict.fromkeys(str(k) for k in keys))
    threshold = s.int_("threshold", 1, minimum=1, maximum=len(unique))
    return TrustConfig(keys=unique, threshold=threshold, allowed_signers=s.path("allowed_signers"))


def _mqtt(top: _Section) -> MqttConfig | None:
    if not top.has("mqtt"):
        return None
    fields = {"host", "port", "tls", "username", "password_file", "protocol", "prefix", "keepalive"}
    s = top.section("mqtt", frozenset(fields))
    tls: MqttTls | None = None
    if s.has("tls"):
        t = s.section("tls", frozenset({"ca_file", "cert_file", "key_file"}))
        tls = MqttTls(ca_file=t.path("ca_file"), cert_file=t.path("cert_file"), key_file=t.path("key_file"))
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ConfigError("mqtt.tls: cert_file and key_file go together")
    prefix = s.topic_prefix("prefix", "fleet/v1")
    default_port = 8883 if tls is not None else 1883
    return MqttConfig(host=s.req_str("host"), port=s.int_("port", default_port, minimum=1, maximum=65535),
                      tls=tls, username=s.opt_str("username"), password_file=s.path("password_file"),
                      protocol=s.choice("protocol", "5", ("5", "3.1.1")), prefix=prefix,
                      keepalive=s.int_("keepalive", 60, minimum=5, maximum=3600))


_TOP_KEYS = frozenset({
    "device_id", "labels", "profile", "profile_dirs", "repo", "trust", "mqtt", "mode", "intervals",
    "backoff", "root", "state_dir", "log_level",
})


def parse_config(raw: object, base_dir: Path) -> AgentConfig:
    """Validate an already-parsed ``agent.yaml`` value; relative paths resolve against ``base_dir``.

    Raises:
        ConfigError: naming the first invalid field and why.
    """
    top = _Section(raw, "", _TOP_KEYS, base_dir)
    device_id = top.req_str("device_id")
    if not _DEVICE_ID.match(device_id):
        raise ConfigError("device_id: must be 1-64 characters of A-Z a-z 0-9 . _ -")
    profile = top.str_("profile", "generic-linux")
    if not _DEVICE_ID.match(profile):
        raise ConfigError("profile: must be 1-64 characters of A-Z a-z 0-9 . _ -")
    iv = top.section("intervals", frozenset({"poll", "drift", "health"}))
    intervals = Intervals(poll=iv.duration("poll", 300.0), drift=iv.duration("drift", 60.0),
                          health=iv.duration("health", 60.0))
    bo = top.section("backoff", frozenset({"base", "cap"}))
    backoff = BackoffConfig(base=bo.duration("base", 1.0), cap=bo.duration("cap", 300.0))
    if backoff.cap < backoff.base:
        raise ConfigError("backoff.cap: must not be below backoff.base")
    return AgentConfig(
        device_id=device_id, repo=_repo(top), trust=_trust(top), labels=_labels(top), profile=profile,
        profile_dirs=_profile_dirs(top), mqtt=_mqtt(top),
        mode=top.choice("mode", "enforce", ("enforce", "audit")), intervals=intervals, backoff=backoff,
        root=top.req_path("root", Path("/")),
        state_dir=top.req_path("state_dir", Path("/var/lib/edge-agent")),
        log_level=top.choice("log_level", "info", LOG_LEVELS),
    )


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``agent.yaml`` at ``path``.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or a field is invalid.
    """
    path = Path(path)
    doc = _Section.read_located(path)
    if doc.value is None:
        raise ConfigError(f"{path}: is empty")
    base = path.resolve().parent
    try:
        return parse_config(doc.value, base)
    except ConfigError as exc:
        raise ConfigError(located_reason(str(exc), path, doc)) from exc
