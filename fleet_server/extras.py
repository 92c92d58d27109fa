"""What ``fleet-server`` does when the ``server`` extras (FastAPI, uvicorn, ...) are not installed.

A device installs ``edge-fleet`` without them; started there, ``fleet-server`` says in one line
what to install instead of printing an import traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

__all__ = ["INSTALL_HINT", "exit_without_server_extras"]

INSTALL_HINT = "pip install 'edge-fleet[server]'"
_OWN_PACKAGES = frozenset({"fleet_server", "edge_core", "edge_agent"})


def exit_without_server_extras(exc: ImportError) -> NoReturn:
    """Exit with status 1 and a one-line reason naming the missing module and the extras to install.

    Raises:
        ImportError: ``exc`` again when the missing module is one of this project's own (a broken
            install, not a missing extra) or is not named.
        SystemExit: otherwise, with status 1.
    """
    name = exc.name
    if not name or name.partition(".")[0] in _OWN_PACKAGES:
        raise exc
    sys.stderr.write(f"fleet-server needs the server extras: {INSTALL_HINT} (missing: {name})\n")
    raise SystemExit(1)
