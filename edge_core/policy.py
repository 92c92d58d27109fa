"""What a device profile allows a release to do: one refusal message for ``fleetctl lint`` and the agent.

Pure: it takes a parsed resource or health check and a :class:`DeviceProfile` and returns ``None``
(allowed) or a :class:`Refusal` whose ``message`` both ``fleetctl lint`` (with file and line) and
the agent (refusing the release before anything changes) print. The rules:

* the resource kind is in ``drivers``; the health-check kind in ``health_checks``;
* every path is inside ``allowed_roots`` and not under ``denied_roots``;
* a ``systemd_unit`` names a unit matching ``systemd_units``, and so must every path of any kind
  inside a systemd unit directory (a unit file, a ``NAME.d/`` drop-in, a ``TARGET.wants/`` link
  all run code through ``ExecStart=`` and friends);
* a ``sysctl`` key matches ``sysctl_keys``; any other kind writing a sysctl configuration file
  (``/etc/sysctl.d/``, ``/etc/sysctl.conf`` ...) can set any key at boot, so it needs a profile
  that allows every key (``sysctl_keys: ["*"]``);
* ``file``, ``directory`` and ``secret_file`` modes carry no setuid, setgid or world-writable bit,
  and a ``secret_file`` is not world-readable, unless ``allow_modes`` opts in.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from edge_core.errors import ConfinementError, DriverUnavailable, EdgeFleetError
from edge_core.paths import is_under
from edge_core.profiles import DeviceProfile
from edge_core.resources import Directory, File, HealthCheck, Resource, SecretFile, Sysctl, SystemdUnit

__all__ = ["SYSCTL_CONFIG_PATHS", "UNIT_DIRS", "Refusal", "check_refusal", "resource_refusal",
           "unit_names_of"]

UNIT_DIRS = tuple(f"{base}/{scope}" for base in ("/etc/systemd", "/run/systemd", "/usr/lib/systemd",
                                                 "/lib/systemd", "/usr/local/lib/systemd")
                  for scope in ("system", "user"))
"""Directories whose entries systemd reads as units, drop-ins and dependency links."""
SYSCTL_CONFIG_PATHS = ("/etc/sysctl.conf", "/etc/sysctl.d", "/run/sysctl.d", "/usr/lib/sysctl.d",
                       "/lib/sysctl.d", "/usr/local/lib/sysctl.d")
"""Files and directories ``systemd-sysctl`` / ``sysctl --system`` read at boot."""
_LINK_DIR_SUFFIXES = (".wants", ".requires", ".upholds")
_MODE_BITS = (("setuid", 0o4000, "sets the setuid bit"), ("setgid", 0o2000, "sets the setgid bit"),
              ("world_writable", 0o002, "is world-writable"))


@dataclass(frozen=True)
class Refusal:
    """Why a profile refuses one resource or health check.

    ``subject`` names it (``resource 'x'``, ``health check 'y'``), ``reason`` says what the profile
    refuses, ``error`` is the exception class the agent raises with :attr:`message`.
    """

    subject: str
    reason: str
    error: type[EdgeFleetError]

    @property
    def message(self) -> str:
        """The one line lint and the agent print: ``<subject>: <reason>``."""
        return f"{self.subject}: {self.reason}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _listed(patterns: tuple[str, ...]) -> str:
    return ", ".join(patterns) if patterns else "none"


def unit_names_of(path: str) -> tuple[str, ...]:
    """Return the systemd units a device path inside a unit directory configures (``()`` elsewhere).

    ``/etc/systemd/system/a.service`` -> ``a.service``; ``.../a.service.d/x.conf`` -> ``a.service``;
    ``.../multi-user.target.wants/b.service`` -> ``multi-user.target``, ``b.service``.
    """
    for base in UNIT_DIRS:
        if path.startswith(base + "/"):
            parts = path[len(base) + 1:].split("/")
            first = parts[0].removesuffix(".d")
            names = [first]
            for suffix in _LINK_DIR_SUFFIXES:
                if first.endswith(suffix):
                    names = [first.removesuffix(suffix), *parts[1:2]]
            return tuple(n for n in names if n)
    return ()


def _root_refusal(res: Resource, profile: DeviceProfile) -> str | None:
    for p in res.paths:
        if not is_under(p, profile.allowed_roots):
            return f"{p} is outside the allowed roots of device profile {profile.name!r}"
        if is_under(p, profile.denied_roots):
            return f"{p} is under a root device profile {profile.name!r} denies"
    return None


def _code_path_refusal(res: Resource, profile: DeviceProfile) -> str | None:
    where = f"device profile {profile.name!r}"
    for p in res.paths:
        for unit in unit_names_of(p):
            if not _matches(unit, profile.systemd_units):
                return (f"{p} configures systemd unit {unit!r}, which {where} does not allow (systemd_units: "
                        f"{_listed(profile.systemd_units)})")
        sysctl_file = not isinstance(res, Sysctl) and is_under(p, SYSCTL_CONFIG_PATHS)
        if sysctl_file and "*" not in profile.sysctl_keys:
            return (f"{p} is a sysctl configuration file, which can set any kernel parameter; {where} "
                    "allows that only with sysctl_keys: [\"*\"]")
    return None


def _mode_refusal(res: Resource, profile: DeviceProfile) -> str | None:
    if not isinstance(res, File | Directory | SecretFile) or res.mode is None:
        return None
    bits = list(_MODE_BITS)
    if isinstance(res, SecretFile):
        bits.append(("world_readable_secret", 0o004, "makes a secret world-readable"))
    for opt_in, bit, what in bits:
        if res.mode & bit and opt_in not in profile.allow_modes:
            return (f"mode {res.mode:04o} {what}, which device profile {profile.name!r} refuses "
                    f"(allow_modes: [{opt_in}] opts in)")
    return None


def resource_refusal(res: Resource, profile: DeviceProfile) -> Refusal | None:
    """Return why ``profile`` refuses resource ``res``, or ``None`` when it allows it."""
    subject = f"resource {res.id!r}"
    by = f"device profile {profile.name!r}"
    if res.kind not in profile.drivers:
        return Refusal(subject, f"kind {res.kind!r} is not allowed by {by}", DriverUnavailable)
    roots = _root_refusal(res, profile)
    if roots is not None:
        return Refusal(subject, roots, ConfinementError)
    if isinstance(res, SystemdUnit) and not _matches(res.name, profile.systemd_units):
        return Refusal(subject, f"systemd unit {res.name!r} is not allowed by {by} "
                                f"(systemd_units: {_listed(profile.systemd_units)})", DriverUnavailable)
    if isinstance(res, Sysctl) and not _matches(res.name, profile.sysctl_keys):
        return Refusal(subject, f"sysctl key {res.name!r} is not allowed by {by} "
                                f"(sysctl_keys: {_listed(profile.sysctl_keys)})", DriverUnavailable)
    code_path = _code_path_refusal(res, profile)
    if code_path is not None:
        return Refusal(subject, code_path, ConfinementError)
    mode = _mode_refusal(res, profile)
    if mode is not None:
        return Refusal(subject, mode, DriverUnavailable)
    return None


def check_refusal(check: HealthCheck, profile: DeviceProfile) -> Refusal | None:
    """Return why ``profile`` refuses health check ``check`` of a bundle, or ``None`` when it allows it."""
    if check.kind not in profile.check_kinds:
        return Refusal(f"health check {check.name!r}",
                       f"kind {check.kind!r} is not allowed by device profile {profile.name!r} "
                       f"(health_checks: {_listed(tuple(sorted(profile.check_kinds)))})", DriverUnavailable)
    return None
