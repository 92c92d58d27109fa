"""The ``notifications:`` section of ``server.yaml``: a list of webhook receivers, each validated
once into a frozen :class:`Receiver` (every key in ``docs/server-config.md``)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from edge_core.config_section import ConfigSection
from fleet_server.errors import ServerConfigError
from fleet_server.notify.events import EVENTS

__all__ = ["MAX_RECEIVERS", "Receiver", "parse_notifications"]

MAX_RECEIVERS = 32
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_KEYS = frozenset({"name", "url", "events", "secret_file", "timeout", "retry_for", "offline_after"})


@dataclass(frozen=True)
class Receiver:
    """One webhook receiver: where to POST, which events, the signing secret's file and its limits."""

    name: str
    url: str
    events: tuple[str, ...]
    secret_file: Path | None = None
    timeout: float = 10.0
    """Seconds to connect, and to wait for each piece of the answer."""
    retry_for: float = 86400.0
    """Seconds after its event that an undelivered notification is given up (state ``failed``)."""
    offline_after: float = 900.0
    """Seconds a device must be offline before ``device.offline`` is sent about it."""

    def wants(self, event: str) -> bool:
        """Tell whether this receiver subscribed to ``event``."""
        return "*" in self.events or event in self.events


class _Section(ConfigSection):
    error = ServerConfigError
    document = "config"


def _url(s: _Section) -> str:
    url = s.req_str("url")
    try:
        parts = urllib.parse.urlsplit(url)
        host_ok = bool(parts.hostname)
        has_userinfo = "@" in parts.netloc
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise ServerConfigError(f"{s.at('url')}: not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not host_ok or not port_ok:
        raise ServerConfigError(f"{s.at('url')}: must be an http:// or https:// URL with a host")
    if has_userinfo:
        raise ServerConfigError(f"{s.at('url')}: must not carry credentials (sign with secret_file instead)")
    return url


def _events(s: _Section) -> tuple[str, ...]:
    raw = s.raw.get("events")
    if raw is None:
        raise ServerConfigError(f"{s.at('events')}: required (a list of event names, or [\"*\"])")
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise ServerConfigError(f"{s.at('events')}: must be a non-empty list of event names")
    for i, name in enumerate(raw):
        if name != "*" and name not in EVENTS:
            raise ServerConfigError(f"{s.at('events')}[{i}]: unknown event {name[:80]!r}; one of "
                                    + ", ".join(EVENTS) + " or *")
    return tuple(dict.fromkeys(raw))


def parse_notifications(raw: object, base_dir: Path) -> tuple[Receiver, ...]:
    """Validate the ``notifications`` list (None: no receivers); relative paths resolve against
    ``base_dir``.

    Raises:
        ServerConfigError: naming the first invalid field (``notifications[0].url: ...``) and why.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ServerConfigError("notifications: must be a list of receivers")
    if len(raw) > MAX_RECEIVERS:
        raise ServerConfigError(f"notifications: at most {MAX_RECEIVERS} receivers")
    out: list[Receiver] = []
    for i, item in enumerate(raw):
        s = _Section(item, f"notifications[{i}]", _KEYS, base_dir)
        name = s.str_("name", "", _NAME)
        if not name:
            raise ServerConfigError(f"{s.at('name')}: required (letters, digits, . _ -)")
        if any(r.name == name for r in out):
            raise ServerConfigError(f"{s.at('name')}: {name!r} names another receiver too")
        out.append(Receiver(name=name, url=_url(s), events=_events(s), secret_file=s.path("secret_file"),
                            timeout=s.duration("timeout", 10.0), retry_for=s.duration("retry_for", 86400.0),
                            offline_after=s.duration("offline_after", 900.0)))
    return tuple(out)
