"""`fleetctl broker-config`: Mosquitto password, ACL and config files for the fleet."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleet_server.broker_config import DEFAULT_DATA_DIR, read_device_ids, write_broker_config
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, emit
from fleet_server.errors import UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker-config`` to the fleetctl parser."""
    cmd = subparsers.add_parser(
        "broker-config", help="write Mosquitto password, ACL and config files for the fleet",
        description="Write passwd (hashed with mosquitto_passwd), acl, mosquitto.conf and "
                    "credentials/<id>.password (0600, to install on each device) under --out. Each "
                    "device may publish only under its own id; existing credentials are reused.",
        epilog="""examples:
  fleetctl broker-config --out /etc/mosquitto/fleet --devices devices.txt
  fleetctl broker-config --out broker/ --devices gw-1 gw-2 --bind 10.0.0.5 --port 8883 --json
  fleetctl broker-config --out /etc/mosquitto/fleet --devices devices.txt --rotate   # new passwords
""", formatter_class=ExamplesHelpFormatter)
    cmd.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write into")
    cmd.add_argument("--devices", required=True, nargs="+", metavar="FILE_OR_ID",
                     help="device ids, or files with one id a line")
    cmd.add_argument("--server-user", action="append", metavar="NAME",
                     help="a broker user for the fleet server (default: fleet-server); repeat for one "
                          "per server process or tool that connects at the same time")
    cmd.add_argument("--server-password-file", type=Path, metavar="FILE",
                     help="use this password for the first server user instead of a generated one")
    cmd.add_argument("--prefix", default="fleet/v1", help="the topic prefix (default: fleet/v1)")
    cmd.add_argument("--port", type=int, default=1883, help="the listener port in mosquitto.conf")
    cmd.add_argument("--bind", metavar="ADDRESS", help="the listener address in mosquitto.conf")
    cmd.add_argument("--conf-dir", type=Path, metavar="DIR",
                     help="where the files will be installed, as named in mosquitto.conf (default: --out)")
    cmd.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR",
                     help="the broker's persistence_location: where it keeps retained messages and "
                          f"sessions (default: {DEFAULT_DATA_DIR}/)")
    cmd.add_argument("--rotate", action="store_true", help="generate new passwords for everyone")
    add_json_option(cmd, "print a JSON object")
    cmd.set_defaults(func=run_broker_config)


def run_broker_config(args: argparse.Namespace) -> int:
    """Write the broker files; return the exit code.

    Raises:
        UsageError: bad device ids, names or password file, or mosquitto_passwd failed.
    """
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port")
    server_password: str | None = None
    if args.server_password_file is not None:
        try:
            server_password = args.server_password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {args.server_password_file}: {exc}") from exc
    files = write_broker_config(
        args.out, read_device_ids(args.devices), server_users=args.server_user or ["fleet-server"],
        server_password=server_password, prefix=args.prefix, port=args.port, bind=args.bind,
        conf_dir=args.conf_dir, data_dir=args.data_dir, rotate=args.rotate)
    summary = {
        "out": str(files.out), "passwd": str(files.passwd), "acl": str(files.acl), "conf": str(files.conf),
        "credentials": str(files.credentials), "devices": len(files.devices),
        "server_users": list(files.server_users), "created": list(files.created),
    }
    text = (f"wrote {files.passwd}, {files.acl} and {files.conf} for {len(files.devices)} device(s); "
            f"{len(files.created)} new credential(s) in {files.credentials}")
    emit(summary, text, as_json=args.json)
    return 0
