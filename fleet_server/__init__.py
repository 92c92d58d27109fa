"""edge-fleet fleet server and the operator's `fleetctl`."""

__version__ = "0.1.0"

__all__ = ["__version__"]
