"""The resource kinds and health checks a bundle declares, as frozen dataclasses.

This module is pure: it turns already-parsed YAML values (dicts, lists, strings) into validated
objects and raises :class:`BundleError` with the location of the first problem of one resource.
Callers that want every problem (``fleetctl lint``) parse resources one by one and collect.
Payload files (``source:``) are *named* here; reading them is the release module's job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from edge_core.envspec import parse_env
from edge_core.errors import BundleError, PathError
from edge_core.paths import validate_device_path, validate_repo_path

__all__ = [
    "CHECK_KINDS",
    "RESOURCE_KINDS",
    "Absent",
    "CommandCheck",
    "CommandRes",
    "Directory",
    "DiskFreeCheck",
    "File",
    "HealthCheck",
    "HttpCheck",
    "MemoryCheck",
    "Resource",
    "SecretFile",
    "Symlink",
    "Sysctl",
    "SystemdActiveCheck",
    "SystemdUnit",
    "TcpCheck",
    "TemperatureCheck",
    "parse_check",
    "parse_resource",
]

Where = tuple[str | int, ...]

# Neither may start with "-": a name reaches systemctl/sysctl argv and must never read as an option.
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\][A-Za-z0-9:_.@\\-]*\.(service|socket|timer|path|mount|target)$")
_SYSCTL_NAME = re.compile(r"^[a-z0-9_][a-z0-9_\-]*(\.[A-Za-z0-9_\-]+)+$")
_ACCOUNT = re.compile(r"^([a-z_][a-z0-9_\-]*\$?|[0-9]+)$")
_ID = re.compile(r"^[A-Za-z0-9_.:/@\-]{1,200}$")


class _Fields:
    """Reads typed fields from one mapping, raising BundleError with the location."""

    def __init__(self, raw: object, where: Where, allowed: frozenset[str]) -> None:
        if not isinstance(raw, Mapping):
            raise BundleError("must be a mapping", where)
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise BundleError(f"unknown field {unknown[0]!r}", (*where, unknown[0]))
        self.raw: Mapping[str, Any] = raw
        self.where = where

    def at(self, name: str) -> Where:
        return (*self.where, name)

    def str_(self, name: str, *, required: bool = False, default: str | None = None) -> str | None:
        v = self.raw.get(name)
        if v is None:
            if required:
                raise BundleError(f"{name!r} is required", self.at(name))
            return default
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise BundleError(f"{name!r} must be a string", self.at(name))
        return str(v)

    def req_str(self, name: str) -> str:
        v = self.str_(name, required=True)
        assert v is not None
        return v

    def bool_(self, name: str, default: bool | None = None) -> bool | None:
        v = self.raw.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise BundleError(f"{name!r} must be true or false", self.at(name))
        return v

    def number(self, name: str, default: float | None = None, *, minimum: float = 0.0) -> float | None:
        v = self.raw.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise BundleError(f"{name!r} must be a number", self.at(name))
        if v < minimum:
            raise BundleError(f"{name!r} must be at least {minimum:g}", self.at(name))
        return float(v)

    def device_path(self, name: str, *, required: bool = True) -> str | None:
        v = self.raw.get(name)
        if v is None and not required:
            return None
        try:
            return validate_device_path(v)
        except PathError as exc:
            raise BundleError(str(exc), self.at(name)) from exc

    def repo_path(self, name: str) -> str | None:
        v = self.raw.get(name)
        if v is None:
            return None
        try:
            return validate_repo_path(v)
        except PathError as exc:
            raise BundleError(str(exc), self.at(name)) from exc

    def mode(self, name: str = "mode") -> int | None:
        v = self.raw.get(name)
        if v is None:
            return None
        if isinstance(v, bool):
            raise BundleError("mode must be an octal string such as \"0644\"", self.at(name))
        if isinstance(v, int):  # YAML 1.1 reads an unquoted 0644 as octal already
            m = v
        elif isinstance(v, str) and re.fullmatch(r"0?[0-7]{3,4}", v):
            m = int(v, 8)
        else:
            raise BundleError("mode must be an octal string such as \"0644\"", self.at(name))
        if not 0 <= m <= 0o7777:
            raise BundleError("mode is out of range", self.at(name))
        return m

    def account(self, name: str) -> str | None:
        v = self.str_(name)
        if v is not None and not _ACCOUNT.match(v):
            raise BundleError(f"{name!r} is not a valid user or group name", self.at(name))
        return v

    def argv_or_shell(self, name: str, *, required: bool) -> tuple[str, ...] | str | None:
        v = self.raw.get(name)
        if v is None:
            if required:
                raise BundleError(f"{name!r} is required", self.at(name))
            return None
        if isinstance(v, str) and v.strip():
            return v
        if isinstance(v, list) and v and all(isinstance(a, str) for a in v):
            return tuple(v)
        raise BundleError(f"{name!r} must be a shell string or a non-empty list of strings", self.at(name))

    def env_map(self, name: str = "env") -> tuple[tuple[str, str], ...]:
        """Read an ``env:`` mapping (see :func:`edge_core.envspec.parse_env`)."""
        return parse_env(self.raw.get(name), self.at(name))

    def str_list(self, name: str) -> tuple[str, ...]:
        v = self.raw.get(name)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
            raise BundleError(f"{name!r} must be a list of strings", self.at(name))
        return tuple(v)


@dataclass(frozen=True)
class Resource:
    """Fields every resource has. ``id`` is unique within a device's release."""

    kind: ClassVar[str] = ""
    id: str
    bundle: str

    @property
    def paths(self) -> tuple[str, ...]:
        """Device paths this resource writes (checked against the profile's allowed roots)."""
        return ()


@dataclass(frozen=True)
class _Owned(Resource):
    path: str
    mode: int | None = None
    owner: str | None = None
    group: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        """Device paths this resource writes."""
        return (self.path,)


@dataclass(frozen=True)
class File(_Owned):
    """A regular file with inline ``content`` or a ``source`` payload file in the bundle."""

    kind: ClassVar[str] = "file"
    content: str | None = None
    source: str | None = None
    template: bool = False


@dataclass(frozen=True)
class Directory(_Owned):
    """A directory (created with its parents' existing permissions untouched)."""

    kind: ClassVar[str] = "directory"


@dataclass(frozen=True)
class Symlink(Resource):
    """A symbolic link at ``path`` pointing to ``target``."""

    kind: ClassVar[str] = "symlink"
    path: str = ""
    target: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        """Device paths this resource writes."""
        return (self.path,)


@dataclass(frozen=True)
class Absent(Resource):
    """Make sure nothing exists at ``path`` (a file, a symlink or an empty-able directory tree)."""

    kind: ClassVar[str] = "absent"
    path: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        """Device paths this resource writes."""
        return (self.path,)


@dataclass(frozen=True)
class SystemdUnit(Resource):
    """A systemd unit: optional unit file, enabled and running state, restart on watched changes."""

    kind: ClassVar[str] = "systemd_unit"
    name: str = ""
    content: str | None = None
    source: str | None = None
    unit_dir: str = "/etc/systemd/system"
    enabled: bool | None = None
    running: bool | None = None
    watch: tuple[str, ...] = ()

    @property
    def unit_path(self) -> str | None:
        """Where the unit file is written, when the resource declares one."""
        if self.content is None and self.source is None:
            return None
        return f"{self.unit_dir}/{self.name}"

    @property
    def paths(self) -> tuple[str, ...]:
        """Device paths this resource writes."""
        p = self.unit_path
        return (p,) if p else ()


@dataclass(frozen=True)
class Sysctl(Resource):
    """A kernel parameter, set now and (when ``persist``) in ``/etc/sysctl.d``."""

    kind: ClassVar[str] = "sysctl"
    name: str = ""
    value: str = ""
    persist: bool = True

    @property
    def persist_path(self) -> str | None:
        """The sysctl.d drop-in written when ``persist`` is true."""
        return f"/etc/sysctl.d/60-edge-fleet-{self.name}.conf" if self.persist else None

    @property
    def paths(self) -> tuple[str, ...]:
        """Device paths this resource writes."""
        p = self.persist_path
        return (p,) if p else ()


@dataclass(frozen=True)
class SecretFile(_Owned):
    """A file whose content is a sealed secret of the repo, opened on the device only."""

    kind: ClassVar[str] = "secret_file"
    secret: str = ""


@dataclass(frozen=True)
class CommandRes(Resource):
    """A command for what nothing else covers, guarded by ``creates``/``unless``/``onlyif``."""

    kind: ClassVar[str] = "command"
    name: str = ""
    run: tuple[str, ...] | str = ()
    creates: str | None = None
    unless: tuple[str, ...] | str | None = None
    onlyif: tuple[str, ...] | str | None = None
    timeout: float = 60.0
    watch: tuple[str, ...] = ()
    refresh_only: bool = False
    env: tuple[tuple[str, str], ...] = ()


RESOURCE_KINDS: dict[str, type[Resource]] = {
    c.kind: c for c in (File, Directory, Symlink, Absent, SystemdUnit, Sysctl, SecretFile, CommandRes)
}

_COMMON = frozenset({"kind", "id"})


def parse_resource(raw: object, bundle: str, where: Where = ()) -> Resource:
    """Validate one resource mapping of ``bundle`` and return its dataclass.

    Raises:
        BundleError: unknown kind, unknown or missing field, bad type, unsafe path.
    """
    if not isinstance(raw, Mapping):
        raise BundleError("a resource must be a mapping", where)
    kind = raw.get("kind")
    if kind not in RESOURCE_KINDS:
        known = ", ".join(sorted(RESOURCE_KINDS))
        raise BundleError(f"unknown resource kind {kind!r} (known: {known})", (*where, "kind"))
    parser = _PARSERS[str(kind)]
    res = parser(raw, bundle, where)
    if not _ID.match(res.id):
        raise BundleError(f"invalid resource id {res.id!r}", (*where, "id"))
    return res


def _rid(f: _Fields, kind: str, key: str) -> str:
    explicit = f.str_("id")
    return explicit if explicit is not None else f"{kind}:{key}"


def _content_or_source(f: _Fields, *, required: bool) -> tuple[str | None, str | None]:
    content = f.raw.get("content")
    if content is not None and not isinstance(content, str):
        raise BundleError("'content' must be a string", f.at("content"))
    source = f.repo_path("source")
    if content is not None and source is not None:
        raise BundleError("give either 'content' or 'source', not both", f.where)
    if required and content is None and source is None:
        raise BundleError("one of 'content' or 'source' is required", f.where)
    return content, source


def _file(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"path", "content", "source", "mode", "owner", "group", "template"})
    path = f.device_path("path")
    assert path is not None
    content, source = _content_or_source(f, required=True)
    return File(
        id=_rid(f, "file", path), bundle=bundle, path=path, mode=f.mode(), owner=f.account("owner"),
        group=f.account("group"), content=content, source=source,
        template=bool(f.bool_("template", False)),
    )


def _directory(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"path", "mode", "owner", "group"})
    path = f.device_path("path")
    assert path is not None
    return Directory(id=_rid(f, "directory", path), bundle=bundle, path=path, mode=f.mode(),
                     owner=f.account("owner"), group=f.account("group"))


def _symlink(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"path", "target"})
    path = f.device_path("path")
    assert path is not None
    target = f.req_str("target")
    if "\x00" in target:
        raise BundleError("symlink target contains a NUL byte", f.at("target"))
    return Symlink(id=_rid(f, "symlink", path), bundle=bundle, path=path, target=target)


def _absent(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"path"})
    path = f.device_path("path")
    assert path is not None
    return Absent(id=_rid(f, "absent", path), bundle=bundle, path=path)


def _checked_name(f: _Fields, field: str, what: str, pattern: re.Pattern[str]) -> str:
    name = f.req_str(field)
    if name.startswith("-"):
        raise BundleError(f"invalid {what} {name!r}: a name must not start with '-'", f.at(field))
    if not pattern.match(name):
        raise BundleError(f"invalid {what} {name!r}", f.at(field))
    return name


def _systemd_unit(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    fields = {"name", "content", "source", "unit_dir", "enabled", "running", "watch"}
    f = _Fields(raw, where, _COMMON | fields)
    name = _checked_name(f, "name", "systemd unit name", _UNIT_NAME)
    content, source = _content_or_source(f, required=False)
    unit_dir = f.device_path("unit_dir", required=False) or "/etc/systemd/system"
    return SystemdUnit(
        id=_rid(f, "systemd_unit", name), bundle=bundle, name=name, content=content, source=source,
        unit_dir=unit_dir, enabled=f.bool_("enabled"), running=f.bool_("running"), watch=f.str_list("watch"),
    )


def _sysctl(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"name", "value", "persist"})
    name = _checked_name(f, "name", "sysctl name", _SYSCTL_NAME)
    value = f.req_str("value")
    if "\n" in value or "\x00" in value:
        raise BundleError("sysctl value must be one line", f.at("value"))
    return Sysctl(id=_rid(f, "sysctl", name), bundle=bundle, name=name, value=value,
                  persist=bool(f.bool_("persist", True)))


def _secret_file(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"path", "secret", "mode", "owner", "group"})
    path = f.device_path("path")
    assert path is not None
    secret = f.repo_path("secret")
    if secret is None:
        raise BundleError("'secret' (the sealed file in the repo) is required", f.at("secret"))
    mode = f.mode()
    return SecretFile(id=_rid(f, "secret_file", path), bundle=bundle, path=path,
                      mode=0o600 if mode is None else mode, owner=f.account("owner"),
                      group=f.account("group"), secret=secret)


def _command(raw: Mapping[str, Any], bundle: str, where: Where) -> Resource:
    f = _Fields(raw, where, _COMMON | {"name", "run", "creates", "unless", "onlyif", "timeout", "watch",
                                       "refresh_only", "env"})
    name = f.req_str("name")
    run = f.argv_or_shell("run", required=True)
    assert run is not None
    return CommandRes(
        id=_rid(f, "command", name), bundle=bundle, name=name, run=run,
        creates=f.device_path("creates", required=False), unless=f.argv_or_shell("unless", required=False),
        onlyif=f.argv_or_shell("onlyif", required=False), timeout=f.number("timeout", 60.0) or 60.0,
        watch=f.str_list("watch"), refresh_only=bool(f.bool_("refresh_only", False)), env=f.env_map(),
    )


_PARSERS = {
    "file": _file, "directory": _directory, "symlink": _symlink, "absent": _absent,
    "systemd_unit": _systemd_unit, "sysctl": _sysctl, "secret_file": _secret_file, "command": _command,
}


# --- health checks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """Fields every health check has; ``timeout`` bounds one attempt in seconds."""

    kind: ClassVar[str] = ""
    name: str
    timeout: float = 10.0


@dataclass(frozen=True)
class CommandCheck(HealthCheck):
    """Healthy when the command exits 0 within the timeout."""

    kind: ClassVar[str] = "command"
    run: tuple[str, ...] | str = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SystemdActiveCheck(HealthCheck):
    """Healthy when ``systemctl is-active UNIT`` says active."""

    kind: ClassVar[str] = "systemd_active"
    unit: str = ""


@dataclass(frozen=True)
class TcpCheck(HealthCheck):
    """Healthy when a TCP connection to host:port opens."""

    kind: ClassVar[str] = "tcp"
    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class HttpCheck(HealthCheck):
    """Healthy when a GET of ``url`` answers ``expect_status``."""

    kind: ClassVar[str] = "http"
    url: str = ""
    expect_status: int = 200


@dataclass(frozen=True)
class DiskFreeCheck(HealthCheck):
    """Healthy when the filesystem holding ``path`` has at least ``min_free_percent`` free."""

    kind: ClassVar[str] = "disk_free"
    path: str = "/"
    min_free_percent: float = 10.0


@dataclass(frozen=True)
class MemoryCheck(HealthCheck):
    """Healthy when memory in use is at most ``max_used_percent``."""

    kind: ClassVar[str] = "memory"
    max_used_percent: float = 90.0


@dataclass(frozen=True)
class TemperatureCheck(HealthCheck):
    """Healthy when every temperature sensor reads at most ``max_celsius`` (no sensor: healthy)."""

    kind: ClassVar[str] = "temperature"
    max_celsius: float = 85.0


CHECK_KINDS: dict[str, type[HealthCheck]] = {
    c.kind: c for c in (CommandCheck, SystemdActiveCheck, TcpCheck, HttpCheck, DiskFreeCheck,
                        MemoryCheck, TemperatureCheck)
}


def parse_check(raw: object, where: Where = ()) -> HealthCheck:
    """Validate one health-check mapping and return its dataclass.

    Raises:
        BundleError: unknown kind, unknown or missing field, bad type.
    """
    if not isinstance(raw, Mapping):
        raise BundleError("a health check must be a mapping", where)
    kind = raw.get("kind")
    if kind not in CHECK_KINDS:
        known = ", ".join(sorted(CHECK_KINDS))
        raise BundleError(f"unknown health check kind {kind!r} (known: {known})", (*where, "kind"))
    extra = {
        "command": {"run", "env"}, "systemd_active": {"unit"}, "tcp": {"host", "port"},
        "http": {"url", "expect_status"}, "disk_free": {"path", "min_free_percent"},
        "memory": {"max_used_percent"}, "temperature": {"max_celsius"},
    }[str(kind)]
    f = _Fields(raw, where, frozenset({"kind", "name", "timeout"} | extra))
    timeout = f.number("timeout", 10.0) or 10.0
    name = f.str_("name") or str(kind)
    if kind == "command":
        run = f.argv_or_shell("run", required=True)
        assert run is not None
        return CommandCheck(name=name, timeout=timeout, run=run, env=f.env_map())
    if kind == "systemd_active":
        unit = _checked_name(f, "unit", "systemd unit name", _UNIT_NAME)
        return SystemdActiveCheck(name=name, timeout=timeout, unit=unit)
    if kind == "tcp":
        port = f.number("port", minimum=1)
        if port is None or port > 65535 or port != int(port):
            raise BundleError("'port' must be an integer from 1 to 65535", f.at("port"))
        return TcpCheck(name=name, timeout=timeout, host=f.str_("host") or "127.0.0.1", port=int(port))
    if kind == "http":
        url = f.req_str("url")
        if not url.startswith(("http://", "https://")):
            raise BundleError("'url' must start with http:// or https://", f.at("url"))
        status = int(f.number("expect_status", 200.0) or 200)
        return HttpCheck(name=name, timeout=timeout, url=url, expect_status=status)
    if kind == "disk_free":
        path = "/" if f.raw.get("path") == "/" else f.device_path("path", required=False) or "/"
        return DiskFreeCheck(name=name, timeout=timeout, path=path,
                             min_free_percent=_percent(f, "min_free_percent", 10.0))
    if kind == "memory":
        return MemoryCheck(name=name, timeout=timeout,
                           max_used_percent=_percent(f, "max_used_percent", 90.0))
    return TemperatureCheck(name=name, timeout=timeout, max_celsius=f.number("max_celsius", 85.0) or 85.0)


def _percent(f: _Fields, name: str, default: float) -> float:
    v = f.number(name, default)
    assert v is not None
    if v > 100:
        raise BundleError(f"{name!r} must be a percentage from 0 to 100", f.at(name))
    return v
