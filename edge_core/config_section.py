"""Typed, strict reads from one mapping of a YAML config file, shared by the agent and the server.

Every read names the dotted key it refuses (``mqtt.port: must be from 1 to 65535, got 0``), unknown
keys are refused, and the error raised is the reading program's own (``ConfigError`` for the agent,
a subclass sets another).
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from edge_core.durations import parse_seconds
from edge_core.errors import ConfigError, YamlError
from edge_core.yamlsafe import LocatedDoc, excerpt, load_yaml

__all__ = ["FETCH_LIMIT_KEYS", "LOG_LEVELS", "MAX_CONFIG_BYTES", "URL_SCHEMES", "ConfigSection",
           "fetch_limit_values", "located_reason", "parse_duration", "read_config_bytes"]

MAX_CONFIG_BYTES = 1024 * 1024
URL_SCHEMES = ("file://", "git://", "http://", "https://", "ssh://")
LOG_LEVELS = ("debug", "info", "warning", "error")
_MAX_DURATION = 365 * 86400
_BRANCH = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_BYTE_COUNT = re.compile(r"\s*(\d+)\s*([KMG]i?B?)?\s*")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_duration(value: object, name: str) -> float:
    """Turn ``30``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"`` or ``"250ms"`` into positive seconds.

    Raises:
        ConfigError: not a duration, or not positive, or over a year; ``name`` starts the message.
    """
    try:
        seconds = parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    if not seconds > 0 or seconds > _MAX_DURATION:
        raise ConfigError(f"{name}: duration must be positive and at most a year")
    return seconds


def read_config_bytes(path: Path, error: type[Exception]) -> bytes:
    """Return the bytes of the regular file at ``path`` (symbolic links followed), at most
    :data:`MAX_CONFIG_BYTES`; a FIFO, device or directory is refused before anything is read.

    Raises:
        error: the file cannot be opened, is not a regular file or is over the cap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"cannot read {path}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise error(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise error(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    return data


class ConfigSection:
    """Typed reads from one mapping of the config, with the dotted name for errors.

    ``error`` is the exception every refusal raises; ``document`` names the whole file in the
    message for a top level that is not a mapping. A missing (``None``) section reads as empty.
    """

    error: ClassVar[type[Exception]] = ConfigError
    document: ClassVar[str] = "config"

    def __init__(self, raw: object, name: str, allowed: frozenset[str], base_dir: Path) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(f"{name or self.document}: must be a mapping")
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
            hint = f"; did you mean {self._join(name, near[0])}?" if near else ""
            raise self.error(f"{self._join(name, excerpt(unknown[0]))}: unknown key{hint}")
        self.raw: Mapping[str, Any] = raw
        self.name = name
        self.base_dir = base_dir

    @classmethod
    def read_yaml(cls, path: Path) -> object:
        """The parsed YAML of the config file at ``path`` (None when empty), at most 1 MiB read.

        The file must be a regular file (a symbolic link to one is followed); a FIFO, a device such
        as ``/dev/zero`` or a directory is refused without reading it. The text goes through
        :func:`edge_core.yamlsafe.load_yaml`: one document, no anchors or aliases, no duplicate
        keys, nesting at most 64 deep.

        Raises:
            the section's ``error``: unreadable, not a regular file, too large, not UTF-8 or not
            (safe) YAML; YAML errors name the file and line.
        """
        return cls.read_located(path).value

    @classmethod
    def read_located(cls, path: Path) -> LocatedDoc:
        """The config file at ``path`` as :meth:`read_yaml` reads it, with the line of every key.

        Raises:
            the section's ``error``: as :meth:`read_yaml`.
        """
        data = read_config_bytes(path, cls.error)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise cls.error(f"{path}: not valid YAML: not UTF-8 text (byte {exc.start})") from exc
        try:
            return load_yaml(data, name=str(path), max_bytes=MAX_CONFIG_BYTES)
        except YamlError as exc:
            reason = exc.reason.partition(": ")[2]
            raise cls.error(f"{path}: not valid YAML: line {exc.line}: {reason}") from exc

    @staticmethod
    def _join(name: str, key: str) -> str:
        return f"{name}.{key}" if name else key

    def at(self, key: str) -> str:
        """The dotted name of ``key`` in this section, as error messages show it."""
        return self._join(self.name, key)

    def has(self, key: str) -> bool:
        """True when ``key`` is present with a value other than null."""
        return self.raw.get(key) is not None

    def section(self, key: str, allowed: frozenset[str]) -> Self:
        """The nested mapping under ``key`` (empty when absent), allowing only ``allowed`` keys."""
        return type(self)(self.raw.get(key), self.at(key), allowed, self.base_dir)

    def opt_str(self, key: str) -> str | None:
        """A non-empty string without NUL, or None when absent."""
        v = self.raw.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v or "\x00" in v:
            raise self.error(f"{self.at(key)}: must be a non-empty string")
        return v

    def str_(self, key: str, default: str, pattern: re.Pattern[str] | None = None) -> str:
        """A non-empty string (matching ``pattern`` when given), or ``default`` when absent."""
        v = self.opt_str(key)
        if v is None:
            return default
        if pattern is not None and not pattern.match(v):
            raise self.error(f"{self.at(key)}: invalid value {excerpt(v)!r}")
        return v

    def req_str(self, key: str) -> str:
        """A non-empty string that must be present."""
        v = self.opt_str(key)
        if v is None:
            raise self.error(f"{self.at(key)}: is required")
        return v

    def mirror_url(self, key: str) -> str | None:
        """A Git mirror URL with a scheme the fetcher speaks, or None when absent."""
        url = self.opt_str(key)
        if url is not None and not url.startswith(URL_SCHEMES):
            raise self.error(f"{self.at(key)}: scheme must be one of {', '.join(URL_SCHEMES)}")
        return url

    def branch(self, key: str, default: str) -> str:
        """A Git branch name (no ``..``, no leading ``/`` or ``-``), or ``default`` when absent."""
        branch = self.str_(key, default)
        if not _BRANCH.match(branch) or ".." in branch or branch.startswith(("/", "-")):
            raise self.error(f"{self.at(key)}: invalid branch name {excerpt(branch)!r}")
        return branch

    def topic_prefix(self, key: str, default: str) -> str:
        """MQTT topic levels without wildcards, or ``default`` when absent."""
        prefix = self.str_(key, default)
        if not _TOPIC_PREFIX.match(prefix):
            raise self.error(f"{self.at(key)}: must be topic levels of [A-Za-z0-9._-] without wildcards")
        return prefix

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` (numbers are read as their text), or ``default`` when absent."""
        v = self.raw.get(key)
        if v is None:
            return default
        text = str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
        if text not in choices:
            raise self.error(f"{self.at(key)}: must be one of {', '.join(choices)}, got {excerpt(repr(v))}")
        return str(text)

    def int_(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        """An integer from ``minimum`` to ``maximum`` (booleans refused), or ``default`` when absent."""
        v = self.raw.get(key)
        if v is None:
            return default
        return self._bounded(key, v, minimum, maximum)

    def size(self, key: str, default: int, *, minimum: int = 1024, maximum: int = 1 << 62) -> int:
        """A byte count such as ``65536``, ``64KiB``, ``256MiB`` or ``1G``, within the bounds."""
        v = self.raw.get(key)
        if v is None:
            return default
        if isinstance(v, str):
            m = _BYTE_COUNT.fullmatch(v)
            if not m:
                raise self.error(f"{self.at(key)}: must be a byte count such as 65536 or 64KiB")
            v = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1]]
        return self._bounded(key, v, minimum, maximum)

    def _bounded(self, key: str, v: object, minimum: int, maximum: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"{self.at(key)}: must be an integer")
        if not minimum <= v <= maximum:
            raise self.error(f"{self.at(key)}: must be from {minimum} to {maximum}, got {excerpt(str(v))}")
        return v

    def duration(self, key: str, default: float) -> float:
        """Positive seconds from ``30``, ``"30s"``, ``"5m"``…, or ``default`` when absent."""
        v = self.raw.get(key)
        if v is None:
            return default
        try:
            return parse_duration(v, self.at(key))
        except ConfigError as exc:
            if self.error is ConfigError:
                raise
            raise self.error(str(exc)) from exc

    def path(self, key: str, default: Path | None = None) -> Path | None:
        """A path (``~`` expanded; relative to the config file's folder), or ``default``."""
        v = self.raw.get(key)
        if v is None:
            return default
        if not isinstance(v, str) or not v or "\x00" in v:
            raise self.error(f"{self.at(key)}: must be a path")
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def req_path(self, key: str, default: Path) -> Path:
        """A path, or ``default`` when absent (never None)."""
        p = self.path(key, default)
        assert p is not None
        return p


FETCH_LIMIT_KEYS = frozenset({"max_object_bytes", "max_inflated_bytes", "max_refs",
                              "max_ref_advertisement_bytes", "fetch_deadline"})
"""The keys of a mirror's fetch bounds, the same under the agent's ``repo:`` and the server's ``git:``."""


def fetch_limit_values(s: ConfigSection) -> dict[str, Any]:
    """Return the fetch bounds of ``s`` (the :data:`FETCH_LIMIT_KEYS`, defaults where absent) as
    keyword arguments for a config dataclass.

    Raises:
        the section's error type: a bound of the wrong type or out of range.
    """
    from edge_core.gitlimits import FetchLimits  # noqa: PLC0415 - only configs with a mirror need it

    return {"max_object_bytes": s.size("max_object_bytes", FetchLimits.max_object_bytes),
            "max_inflated_bytes": s.size("max_inflated_bytes", FetchLimits.max_inflated_bytes),
            "max_refs": s.int_("max_refs", FetchLimits.max_refs, minimum=1, maximum=10_000_000),
            "max_ref_advertisement_bytes": s.size("max_ref_advertisement_bytes",
                                                  FetchLimits.max_ref_advertisement_bytes),
            "fetch_deadline": s.duration("fetch_deadline", FetchLimits.fetch_deadline)}


def located_reason(reason: str, path: Path, doc: LocatedDoc) -> str:
    """``reason`` (a refusal starting with the dotted key it names) prefixed with ``path`` and, when
    that key is in the file, its line: ``agent.yaml:2: lables: unknown key; did you mean labels?``."""
    dotted, sep, _ = reason.partition(": ")
    where = tuple(int(p) if p.isdigit() else p for p in dotted.split(".")) if sep and dotted else ()
    line = doc.lines.get(where) if where else None
    return f"{path}:{line}: {reason}" if line else f"{path}: {reason}"
