"""``fleetctl device pause|resume ID`` (or ``--label KEY=VALUE``): the fleet server's remote pause
of devices, through ``POST /api/v1/devices/{id}/pause|resume`` and ``/api/v1/devices/pause|resume``.

A pause needs ``--reason``; both need the admin token and are audited with ``--actor``.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any

from fleet_server.cli.common import print_json
from fleet_server.errors import ApiError, UsageError

__all__ = ["ACTIONS", "run_pause"]

ACTIONS = ("pause", "resume")
"""The words after ``fleetctl device`` that pause or resume instead of showing a device."""


def run_pause(args: argparse.Namespace, action: str, ids: list[str]) -> int:
    """Pause or resume the device ``ids`` (one at most) or the devices ``args.label`` selects; print
    which were done.

    Raises:
        UsageError: neither or both of an id and ``--label``, or a pause without ``--reason``.
        ApiError: as :func:`fleet_server.cli.devices.api_post` says (unknown device: 404).
    """
    from fleet_server.cli.devices import api_post, client_of  # noqa: PLC0415 - that module registers this one

    reason = (args.reason or "").strip()
    if action == "pause" and not reason:
        raise UsageError("fleetctl device pause needs --reason (it is shown on the device and audited)")
    if bool(ids) == bool(args.label):
        raise UsageError(f"fleetctl device {action} takes one device id or --label KEY=VALUE, not both")
    if len(ids) > 1:
        raise UsageError(f"fleetctl device {action} takes one device id (use --label for several)")
    body: dict[str, Any] = {"reason": reason}
    if ids:
        path = f"/api/v1/devices/{urllib.parse.quote(ids[0], safe='')}/{action}"
    else:
        for raw in args.label:
            key, sep, value = raw.partition("=")
            if not sep or not key or not value:
                raise UsageError(f"--label must be KEY=VALUE, got {raw!r}")
        path, body["label"] = f"/api/v1/devices/{action}", list(args.label)
    client = client_of(args)
    answer = api_post(client.server, path, body, token=client.token, actor=args.actor,
                      timeout=args.http_timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("devices"), list):
        raise ApiError(f"fleet server answered an unexpected document for {path}")
    if args.json:
        print_json(answer)
        return 0
    done = [str(d) for d in answer["devices"]]
    verb = "paused" if action == "pause" else "resumed"
    shown = ", ".join(done[:10]) + (f" and {len(done) - 10} more" if len(done) > 10 else "")
    sys.stdout.write(f"{verb} {len(done)} device(s): {shown}" + (f" ({reason})" if reason else "") + "\n")
    return 0
