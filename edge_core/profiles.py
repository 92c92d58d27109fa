"""Device profiles: the device's own, trusted limits on what any release may do to it.

A profile is local configuration shipped with the agent (``device_profiles/*.yaml`` in the source
tree, installed under ``/usr/share/edge-agent/profiles``); it is never read from the config repo.
It names the directories (or exact files) a release may write (``allowed_roots``), the ones it
must never touch even inside those (``denied_roots``, e.g. the agent's own configuration and
state), the resource kinds the device's drivers may apply (``drivers``), the health-check kinds a
release may declare (``health_checks``), the systemd units and sysctl keys it may manage
(``systemd_units``, ``sysctl_keys``: glob patterns), the file modes it may set beyond the safe ones
(``allow_modes``), and default health checks that run after every apply.

Absent keys take the safe defaults (documented in ``docs/config-repo.md``): ``health_checks``
every kind that runs no code of the release, plus ``command`` only when ``drivers`` lists
``command``; ``systemd_units`` and ``sysctl_keys`` none; ``allow_modes`` none. What a profile
allows is enforced by :mod:`edge_core.policy`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_core.errors import BundleError, ConfigError, PathError
from edge_core.paths import validate_device_path
from edge_core.resources import CHECK_KINDS, RESOURCE_KINDS, HealthCheck, parse_check
from edge_core.yamlsafe import load_yaml

__all__ = [
    "CODE_CHECK_KINDS",
    "INSTALLED_PROFILE_DIR",
    "MODE_OPT_INS",
    "PROFILE_NAME",
    "DeviceProfile",
    "load_profile",
    "load_profile_file",
    "parse_profile",
]

log = logging.getLogger(__name__)

INSTALLED_PROFILE_DIR = Path("/usr/share/edge-agent/profiles")
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_KEYS = frozenset({"name", "description", "allowed_roots", "denied_roots", "drivers", "health",
                   "health_checks", "systemd_units", "sysctl_keys", "allow_modes"})
CODE_CHECK_KINDS = frozenset({"command"})
"""Health-check kinds that run code of the release."""
MODE_OPT_INS = frozenset({"setuid", "setgid", "world_writable", "world_readable_secret"})
"""What ``allow_modes`` may name; each is refused unless the profile lists it."""
_SAFE_CHECK_KINDS = frozenset(CHECK_KINDS) - CODE_CHECK_KINDS
_PATTERN = re.compile(r"^[A-Za-z0-9:_.@\\*?\[\]!/\-]{1,256}$")
_MAX_PROFILE_BYTES = 256 * 1024


@dataclass(frozen=True)
class DeviceProfile:
    """One device class: where releases may write, which drivers run, default health checks."""

    name: str
    allowed_roots: tuple[str, ...]
    drivers: frozenset[str]
    health: tuple[HealthCheck, ...]
    description: str = ""
    denied_roots: tuple[str, ...] = ()
    #: health-check kinds a release may declare (the profile's own ``health`` is trusted)
    check_kinds: frozenset[str] = _SAFE_CHECK_KINDS
    #: glob patterns of the systemd units a ``systemd_unit`` resource (or a file in a unit directory) may name
    systemd_units: tuple[str, ...] = ()
    #: glob patterns of the sysctl keys a ``sysctl`` resource may set
    sysctl_keys: tuple[str, ...] = ()
    #: modes allowed beyond the safe ones: a subset of :data:`MODE_OPT_INS`
    allow_modes: frozenset[str] = frozenset()


def _roots(value: Mapping[str, object], key: str, *, required: bool) -> tuple[str, ...]:
    raw = value.get(key)
    if raw is None and not required:
        return ()
    if not isinstance(raw, list) or (required and not raw):
        raise ConfigError(f"profile {key!r} must be a non-empty list of absolute paths")
    roots: list[str] = []
    for r in raw:
        try:
            roots.append(validate_device_path(r))
        except PathError as exc:
            raise ConfigError(f"profile {key!r}: {exc}") from exc
    return tuple(roots)


def _names(value: Mapping[str, object], key: str, known: frozenset[str] | None) -> tuple[str, ...] | None:
    """A list of names (``None`` when absent); with ``known``, each must be one of them, else a pattern."""
    raw = value.get(key)
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise ConfigError(f"{key!r} must be a list of strings")
    for v in raw:
        if known is not None and v not in known:
            raise ConfigError(f"{key!r}: unknown value {v!r} (known: {', '.join(sorted(known))})")
        if known is None and not _PATTERN.match(v):
            raise ConfigError(f"{key!r}: invalid pattern {v!r}")
    return tuple(raw)


def parse_profile(value: object) -> DeviceProfile:
    """Validate a loaded profile document and return it.

    Raises:
        ConfigError: not a mapping, an unknown key, a bad name, root, driver or health check.
    """
    if not isinstance(value, Mapping):
        raise ConfigError("a device profile must be a mapping")
    unknown = sorted(str(k) for k in value if k not in _KEYS)
    if unknown:
        raise ConfigError(f"unknown profile key {unknown[0]!r}")
    name = value.get("name")
    if not isinstance(name, str) or not PROFILE_NAME.match(name):
        raise ConfigError(f"profile 'name' must match {PROFILE_NAME.pattern}, got {name!r}")
    description = value.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"profile {name}: 'description' must be a string")
    drivers = value.get("drivers")
    if not isinstance(drivers, list) or not drivers or not all(isinstance(d, str) for d in drivers):
        raise ConfigError(f"profile {name}: 'drivers' must be a non-empty list of resource kinds")
    for d in drivers:
        if d not in RESOURCE_KINDS:
            known = ", ".join(sorted(RESOURCE_KINDS))
            raise ConfigError(f"profile {name}: unknown driver {d!r} (known: {known})")
    raw_health = value.get("health") or []
    if not isinstance(raw_health, list):
        raise ConfigError(f"profile {name}: 'health' must be a list of health checks")
    health: list[HealthCheck] = []
    for i, h in enumerate(raw_health):
        try:
            health.append(parse_check(h, ("health", i)))
        except BundleError as exc:
            raise ConfigError(f"profile {name}: {exc}") from exc
    try:
        allowed = _roots(value, "allowed_roots", required=True)
        denied = _roots(value, "denied_roots", required=False)
        checks = _names(value, "health_checks", frozenset(CHECK_KINDS))
        units = _names(value, "systemd_units", None) or ()
        keys = _names(value, "sysctl_keys", None) or ()
        modes = _names(value, "allow_modes", MODE_OPT_INS) or ()
    except ConfigError as exc:
        raise ConfigError(f"profile {name}: {exc}") from exc
    if checks is None:
        checks = tuple(_SAFE_CHECK_KINDS | (CODE_CHECK_KINDS if "command" in drivers else frozenset()))
    return DeviceProfile(name=name, allowed_roots=allowed, drivers=frozenset(drivers), health=tuple(health),
                         description=description, denied_roots=denied, check_kinds=frozenset(checks),
                         systemd_units=units, sysctl_keys=keys, allow_modes=frozenset(modes))


def load_profile_file(path: Path) -> DeviceProfile:
    """Load and check one profile file; its name must match the file's stem.

    Raises:
        ConfigError: the file cannot be read, is not valid YAML, or is not a valid profile.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read device profile {path}: {exc.strerror or exc}") from exc
    try:
        doc = load_yaml(data, name=str(path), max_bytes=_MAX_PROFILE_BYTES)
    except BundleError as exc:
        raise ConfigError(f"device profile {exc}") from exc
    try:
        profile = parse_profile(doc.value)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if profile.name != path.stem:
        raise ConfigError(f"{path}: profile name {profile.name!r} does not match its file name")
    return profile


def load_profile(name: str, search_dirs: Sequence[Path]) -> DeviceProfile:
    """Load the profile ``name`` from ``<dir>/<name>.yaml``, the first of ``search_dirs`` that has it.

    Raises:
        ConfigError: an invalid name, no such profile in any directory, or an invalid profile file.
    """
    if not PROFILE_NAME.match(name):
        raise ConfigError(f"invalid device profile name {name!r}")
    for d in search_dirs:
        candidate = Path(d) / f"{name}.yaml"
        if candidate.is_file():
            return load_profile_file(candidate)
    dirs = ", ".join(str(d) for d in search_dirs) or "(no directories)"
    raise ConfigError(f"device profile {name!r} not found in {dirs}")
