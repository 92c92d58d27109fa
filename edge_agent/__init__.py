"""edge-fleet device agent: fetch, verify, plan, apply and report signed releases."""

__version__ = "0.1.0"

__all__ = ["__version__"]
