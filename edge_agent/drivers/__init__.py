"""Resource drivers of the edge agent, registered by kind (see :mod:`edge_agent.drivers.base`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from edge_agent.drivers.absent import AbsentDriver
from edge_agent.drivers.base import Change, Context, Driver, get_driver, probe_kinds
from edge_agent.drivers.command import CommandDriver
from edge_agent.drivers.directory import DirectoryDriver
from edge_agent.drivers.file import FileDriver
from edge_agent.drivers.secret_file import SecretFileDriver
from edge_agent.drivers.symlink import SymlinkDriver
from edge_agent.drivers.sysctl import SysctlDriver
from edge_agent.drivers.systemd import SystemdDriver

__all__ = ["REGISTRY", "Change", "Context", "Driver", "get_driver", "probe_kinds"]

REGISTRY: Mapping[str, Driver] = MappingProxyType({
    d.kind: d for d in (FileDriver(), DirectoryDriver(), SymlinkDriver(), AbsentDriver(), SecretFileDriver(),
                        SystemdDriver(), SysctlDriver(), CommandDriver())
})
"""kind -> driver instance (read-only; drivers hold no state)."""
