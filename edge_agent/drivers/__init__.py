"""Resource drivers of the edge agent, registered by kind (see :mod:`edge_agent.drivers.base`).

A kind's module is imported the first time the kind is looked up, so a process loads only the
drivers of the kinds its releases use (a release of files never loads the systemd, sysctl,
command or sealed-secret code).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from edge_agent.drivers.base import Change, Context, Driver, get_driver, probe_kinds

__all__ = ["REGISTRY", "Change", "Context", "Driver", "get_driver", "probe_kinds"]

_MODULES: Mapping[str, tuple[str, str]] = {
    "file": ("edge_agent.drivers.file", "FileDriver"),
    "directory": ("edge_agent.drivers.directory", "DirectoryDriver"),
    "symlink": ("edge_agent.drivers.symlink", "SymlinkDriver"),
    "absent": ("edge_agent.drivers.absent", "AbsentDriver"),
    "secret_file": ("edge_agent.drivers.secret_file", "SecretFileDriver"),
    "systemd_unit": ("edge_agent.drivers.systemd", "SystemdDriver"),
    "sysctl": ("edge_agent.drivers.sysctl", "SysctlDriver"),
    "command": ("edge_agent.drivers.command", "CommandDriver"),
}


class _Registry(Mapping[str, Driver]):
    """kind -> driver instance (read-only; drivers hold no state), each imported on first lookup."""

    def __init__(self) -> None:
        self._loaded: dict[str, Driver] = {}

    def __getitem__(self, kind: str) -> Driver:
        driver = self._loaded.get(kind)
        if driver is None:
            module, name = _MODULES[kind]
            cls = getattr(importlib.import_module(module), name)
            driver = self._loaded.setdefault(kind, cls())
            assert driver.kind == kind, (driver, kind)
        return driver

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


REGISTRY: Mapping[str, Driver] = _Registry()
"""kind -> driver instance (read-only; drivers hold no state; each kind's module is loaded on first use)."""
