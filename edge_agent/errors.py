"""The device-runtime errors: failures that only happen while a device applies a release.

They hang under the shared tree of :mod:`edge_core.errors` (same root, same exit code 1)::

    edge_core.errors.EdgeFleetError
    ├── edge_core.errors.DriverError
    │   └── ApplyError                      one change could not be applied
    ├── HealthCheckFailed                   a bundle health check failed or timed out
    └── LockedError                         another apply holds the lock

Every error's ``str()`` is a one-line reason fit for a user.
"""

from __future__ import annotations

from edge_core.errors import DriverError, EdgeFleetError

__all__ = ["ApplyError", "HealthCheckFailed", "LockedError"]


class ApplyError(DriverError):
    """One planned change could not be applied."""


class HealthCheckFailed(EdgeFleetError):
    """A bundle health check failed or timed out."""


class LockedError(EdgeFleetError):
    """Another process holds the apply lock."""
