"""The exception tree of the fleet server and `fleetctl`.

    FleetError
    ├── UsageError (ValueError)      a command was given bad arguments or input
    ├── LintFailed                   `fleetctl lint` found problems (the report is already printed)
    ├── ServerConfigError (ValueError)  the fleet server's configuration is invalid
    ├── ApiError                     the fleet server answered with an error or could not be reached
    ├── StoreError                   the fleet database cannot be opened, read or written
    │   └── StoreRefused             the database refuses this data (retrying the same write cannot help)
    ├── BrokerError (OSError)        the MQTT broker cannot be reached, refused, or did not acknowledge
    └── PlanError (ValueError)       a rollout plan (or maintenance window) is invalid

Errors shared with the agent (trust, bundle format, keys) come from ``edge_core.errors`` and are
caught at the same place in the entry points.
"""

from __future__ import annotations

from edge_core.errors import LocatedError

__all__ = ["ApiError", "BrokerError", "FleetError", "LintFailed", "NotLeader", "PlanError",
           "ServerConfigError", "StoreError", "StoreRefused", "UsageError"]


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


class StoreError(FleetError):
    """The fleet database cannot be opened, read or written (the operation stored nothing)."""


class StoreRefused(StoreError):
    """The database refuses the data of a write (a value out of range, a broken constraint): the same
    write would fail again, unlike a database that is unavailable for a while."""


class NotLeader(StoreError):
    """A rollout write was refused: this server does not hold the leadership, or another server took
    it over since (the stored leadership term is newer than the writer's)."""


class BrokerError(FleetError, OSError):
    """Talking to the MQTT broker failed; the operation may be retried later."""


class PlanError(LocatedError, FleetError, ValueError):
    """A rollout plan, or a maintenance window in it, does not follow the format (located, as a
    bundle error is: see :class:`edge_core.errors.LocatedError`)."""
