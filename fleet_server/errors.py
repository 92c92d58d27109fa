"""The exception tree of the fleet server and `fleetctl`.

    FleetError
    ├── UsageError (ValueError)      a command was given bad arguments or input
    ├── LintFailed                   `fleetctl lint` found problems (the report is already printed)
    ├── ServerConfigError (ValueError)  the fleet server's configuration is invalid
    └── ApiError                     the fleet server answered with an error or could not be reached

Errors shared with the agent (trust, bundle format, keys) come from ``edge_core.errors`` and are
caught at the same place in the entry points.
"""

from __future__ import annotations

__all__ = ["ApiError", "FleetError", "LintFailed", "ServerConfigError", "UsageError"]


class FleetError(Exception):
    """Root of every error raised on purpose by fleet_server."""


class UsageError(FleetError, ValueError):
    """A command was given bad arguments or bad input."""


class LintFailed(FleetError):
    """`fleetctl lint` found problems; they were reported already."""


class ServerConfigError(FleetError, ValueError):
    """The fleet server's configuration is invalid."""


class ApiError(FleetError):
    """The fleet server answered with an error or could not be reached."""
