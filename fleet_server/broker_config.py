"""Mosquitto password, ACL and config files for a fleet (``fleetctl broker-config``).

Every device authenticates with its device id as user name (and, with
``use_username_as_clientid true``, as client id, so no client can take over another's session) and
a random password. The ACL names every device explicitly (no ``pattern`` rules, so nothing depends
on how ``%u`` is substituted): a device may write only
``<prefix>/<id>/{status,events,health,online,plan}`` and read only ``<prefix>/<id>/desired``,
``<prefix>/<id>/control`` (the remote pause), ``<prefix>/<id>/preflight``, the broadcast nudge and
the fleet baseline (``<prefix>/_broadcast/baseline``). The server user reads ``<prefix>/#`` and
writes ``<prefix>/+/desired``, ``<prefix>/+/control``, ``<prefix>/+/preflight``, the baseline and
the nudge; no device id can be ``_broadcast``, so no device writes either broadcast. Several
server users may be named: because the user name is the client id, every server process (MQTT 5
shared subscriptions) and tool that connects at the same time needs its own, or they would take
each other's session over.

Files written under ``out``: ``passwd`` (hashed by the real ``mosquitto_passwd``, 0600),
``acl`` (0644), ``mosquitto.conf`` (0644) and ``credentials/<user>.password`` (0600, the plaintext to
install on each device as its ``mqtt.password_file``). Existing credential files are reused, so
re-running after adding devices changes no one else's password; ``rotate=True`` draws new ones.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_core.errors import MessageError
from edge_core.messages import DEVICE_ID_RE, MAX_MESSAGE_BYTES, baseline_topic, nudge_topic
from fleet_server.errors import UsageError

__all__ = [
    "DEFAULT_DATA_DIR",
    "MAX_INFLIGHT_MESSAGES",
    "MAX_PACKET_BYTES",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_MESSAGES",
    "MQTT_HEADER_HEADROOM",
    "BrokerFiles",
    "acl_text",
    "conf_text",
    "read_device_ids",
    "write_broker_config",
]

log = logging.getLogger(__name__)

MQTT_HEADER_HEADROOM = 4096
"""Bytes allowed above a report's payload for the MQTT fixed header, the topic and MQTT 5 properties."""
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + MQTT_HEADER_HEADROOM
"""``max_packet_size``: the largest report the ingest accepts (``MAX_MESSAGE_BYTES``, the default of
``ingest.max_payload_bytes``), plus header room. Anything larger would be dropped as ``oversized``."""
MAX_INFLIGHT_MESSAGES = 1000
"""Unacknowledged QoS 1 messages the broker sends one client at once (the server acks per batch)."""
MAX_QUEUED_MESSAGES = 1_000_000
"""Messages queued per client beyond those in flight: 100,000 devices publishing ten reports each
while the server is away or slow (Mosquitto's default of 1000 would drop almost all of them)."""
MAX_QUEUED_BYTES = 1024 * 1024 * 1024
"""Bytes queued per client (whichever limit comes first): bounds the broker's memory for the queue."""
DEFAULT_DATA_DIR = Path("/var/lib/mosquitto")
"""Where the broker keeps its persistence database (Debian's mosquitto package uses this folder)."""

_DEVICE_WRITES = ("status", "events", "health", "online", "plan")
_PASSWORD_BYTES = 24
_PASSWD_TIMEOUT = 120.0


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_config` wrote."""

    out: Path
    passwd: Path
    acl: Path
    conf: Path
    credentials: Path
    devices: tuple[str, ...]
    server_users: tuple[str, ...]
    created: tuple[str, ...]
    """Users whose password was newly generated (the others were reused)."""


def _check_user(name: str, what: str) -> str:
    if not DEVICE_ID_RE.match(name):
        raise UsageError(f"invalid {what} {name!r}: must match {DEVICE_ID_RE.pattern}")
    return name


def read_device_ids(items: Iterable[str]) -> list[str]:
    """Turn ``--devices`` arguments into device ids: an existing file holds ids one a line
    (blank lines and ``#`` comments ignored), anything else is an id. Order kept, duplicates dropped.

    Raises:
        UsageError: a file cannot be read, an id is invalid, or there are no ids at all.
    """
    ids: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read the device list {item}: {exc}") from exc
            ids += [line.split("#", 1)[0].strip() for line in lines]
        else:
            ids.append(item.strip())
    out = list(dict.fromkeys(i for i in ids if i))
    for device in out:
        _check_user(device, "device id")
    if not out:
        raise UsageError("no device ids given")
    return out


def acl_text(devices: Sequence[str], *, prefix: str, server_users: Sequence[str]) -> str:
    """Return the Mosquitto ACL file: explicit rules for the server users and every device.

    Raises:
        UsageError: an invalid prefix.
    """
    try:
        nudge = nudge_topic(prefix)
        baseline = baseline_topic(prefix)
    except MessageError as exc:
        raise UsageError(f"invalid topic prefix {prefix!r}") from exc
    lines = [
        "# Generated by `fleetctl broker-config`; regenerate instead of editing.",
        "# No rules before the first `user` line: anonymous clients get nothing.",
    ]
    for user in server_users:
        lines += ["", f"user {user}", f"topic read {prefix}/#", f"topic write {prefix}/+/desired",
                  f"topic write {prefix}/+/control", f"topic write {prefix}/+/preflight",
                  f"topic write {baseline}", f"topic write {nudge}"]
    for device in devices:
        lines += ["", f"user {device}"]
        lines += [f"topic write {prefix}/{device}/{kind}" for kind in _DEVICE_WRITES]
        lines += [f"topic read {prefix}/{device}/desired", f"topic read {prefix}/{device}/control",
                  f"topic read {prefix}/{device}/preflight", f"topic read {nudge}", f"topic read {baseline}"]
    return "\n".join(lines) + "\n"


def conf_text(*, passwd: Path, acl: Path, port: int = 1883, bind: str | None = None,
              data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Return the ``mosquitto.conf`` snippet that enforces the generated files and the fleet's limits
    (``data_dir`` holds the broker's persistence database)."""
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    return "\n".join([
        "# Generated by `fleetctl broker-config`.",
        "per_listener_settings false",
        listener,
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        "use_username_as_clientid true",
        "# A report is at most the server's ingest cap; the broker disconnects a client whose",
        "# packet (payload, topic and MQTT header) is larger, so it never reaches the server.",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "# The fleet server acknowledges a report only after committing it, so it needs many",
        "# unacknowledged messages in flight. Queue limits are per client but set for all: they are",
        "# sized for the server's subscription under a fleet-wide burst; a device's own queue only",
        "# ever holds its desired state and nudges.",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "persistence true",
        f"persistence_location {str(data_dir).rstrip('/')}/",
        "",
    ])


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _credential(directory: Path, user: str, *, given: str | None, rotate: bool) -> tuple[str, bool]:
    """Return ``(password, newly_created)`` for ``user``, writing its 0600 credential file."""
    path = directory / f"{user}.password"
    if given is None and not rotate and path.is_file():
        password = path.read_text(encoding="utf-8").strip()
        if password:
            return password, False
    password = given if given is not None else secrets.token_urlsafe(_PASSWORD_BYTES)
    if not password or "\n" in password or ":" in password:
        raise UsageError(f"the password for {user} must be one line without ':'")
    _write(path, password + "\n", 0o600)
    return password, True


def _hash_passwords(passwd: Path, users: dict[str, str]) -> None:
    """Write ``user:password`` lines and have ``mosquitto_passwd -U`` hash them in place."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise UsageError("mosquitto_passwd was not found on PATH (install the mosquitto package)")
    plain = passwd.with_name(f".{passwd.name}.plain")
    _write(plain, "".join(f"{user}:{password}\n" for user, password in users.items()), 0o600)
    try:
        done = subprocess.run([tool, "-U", str(plain)], capture_output=True, text=True,
                              timeout=_PASSWD_TIMEOUT, check=False)
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()
            raise UsageError(f"mosquitto_passwd failed: {reason[-1] if reason else done.returncode}")
        hashed = plain.read_text(encoding="utf-8")
        if any(":" not in line or not line.split(":", 1)[1].startswith("$")
               for line in hashed.splitlines()):
            raise UsageError("mosquitto_passwd left an unhashed password")
        os.replace(plain, passwd)
    finally:
        plain.unlink(missing_ok=True)


def write_broker_config(out: Path, devices: Sequence[str], *,
                        server_users: Sequence[str] = ("fleet-server",),
                        server_password: str | None = None, prefix: str = "fleet/v1", port: int = 1883,
                        bind: str | None = None, conf_dir: Path | None = None,
                        data_dir: Path = DEFAULT_DATA_DIR, rotate: bool = False) -> BrokerFiles:
    """Write the broker's password, ACL and config files for ``devices`` under ``out``.

    ``conf_dir`` is where the files will be installed (named in ``mosquitto.conf``; default ``out``).
    ``server_password`` is used for the first server user instead of a generated one. ``data_dir`` is
    the broker's ``persistence_location``.

    Raises:
        UsageError: an invalid device id, user name or prefix, a server user is also a device,
            or ``mosquitto_passwd`` is missing or fails.
        OSError: the files cannot be written.
    """
    ids = [_check_user(d, "device id") for d in devices]
    servers = list(dict.fromkeys(_check_user(u, "server user name") for u in server_users))
    if not servers:
        raise UsageError("no server user given")
    clash = sorted(set(servers) & set(ids))
    if clash:
        raise UsageError(f"server user {clash[0]!r} is also listed as a device")
    if not ids:
        raise UsageError("no device ids given")
    acl = acl_text(ids, prefix=prefix, server_users=servers)
    out.mkdir(parents=True, exist_ok=True)
    cred_dir = out / "credentials"
    cred_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(cred_dir, 0o700)
    users: dict[str, str] = {}
    created: list[str] = []
    for user in (*servers, *ids):
        password, new = _credential(cred_dir, user, given=server_password if user == servers[0] else None,
                                    rotate=rotate)
        users[user] = password
        if new:
            created.append(user)
    files = BrokerFiles(out=out, passwd=out / "passwd", acl=out / "acl", conf=out / "mosquitto.conf",
                        credentials=cred_dir, devices=tuple(ids), server_users=tuple(servers),
                        created=tuple(created))
    _hash_passwords(files.passwd, users)
    _write(files.acl, acl, 0o644)
    where = (conf_dir if conf_dir is not None else out).absolute()
    _write(files.conf, conf_text(passwd=where / "passwd", acl=where / "acl", port=port, bind=bind,
                                 data_dir=data_dir), 0o644)
    log.info("broker config for %s devices written to %s (%s new credentials)", len(ids), out, len(created))
    return files
