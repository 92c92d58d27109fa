"""The real parts of the demo, each started as its own process on loopback: the Git mirror
(``git daemon``), Mosquitto with the files of ``fleetctl broker-config``, ``fleet-server`` on SQLite,
and the devices (one ``edge-agent run`` each, with its own root, state and stand-in tools).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from demo.procs import BIN, Children, DemoError, free_port, run_tool, wait_for_port
from fleet_server.store import Store
from tools.standins import write_standins

__all__ = ["REPO", "Device", "FleetServer", "app_listener", "register_devices", "start_broker",
           "start_fleet_server", "start_git_daemon"]

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "demo-admin-token"  # noqa: S105 - a throwaway token for a loopback-only demo server


def start_git_daemon(children: Children, base: Path, logs: Path) -> str:
    """Serve the bare repositories under ``base`` with ``git daemon`` on a free loopback port; return
    the ``git://`` URL of ``fleet.git``.

    Raises:
        DemoError: it did not start.
    """
    port = free_port()
    proc = children.start("git daemon", "mirror", [
        "git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all", "--listen=127.0.0.1",
        f"--port={port}", str(base)], logs / "git-daemon.log")
    wait_for_port(port, "git daemon", alive=lambda: proc.poll() is None)
    return f"git://127.0.0.1:{port}/fleet.git"


@contextlib.contextmanager
def app_listener() -> Iterator[int]:
    """Play the gateway application the health checks probe: accept (and close) connections on a free
    loopback port in a thread; yield the port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, name="gateway-app", daemon=True)
    thread.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK)
                                          else None)
    if found is None:
        raise DemoError("mosquitto is not installed (make demo installs it: tools/ensure-system-packages.sh)")
    return found


def start_broker(children: Children, work: Path, device_ids: Sequence[str], log: Path) -> tuple[int, Path]:
    """Write the fleet's broker files with ``fleetctl broker-config`` and start Mosquitto with them on a
    free loopback port; return the port and the credentials directory (``<user>.password``).

    Raises:
        DemoError: broker-config failed or Mosquitto did not start.
    """
    port = free_port()
    out = work / "broker"
    ids = work / "device-ids.txt"
    ids.write_text("".join(f"{d}\n" for d in device_ids))
    run_tool([BIN / "fleetctl", "broker-config", "--out", out, "--devices", ids, "--port", str(port),
              "--bind", "127.0.0.1", "--data-dir", out])
    conf = out / "mosquitto.conf"
    # As root, Mosquitto would drop privileges to its own user; it must keep ours to read the files.
    conf.write_text(f"user {pwd.getpwuid(os.getuid()).pw_name}\n" + conf.read_text()
                    + f"log_dest file {out / 'mosquitto.log'}\n")
    proc = children.start("mosquitto", "broker", [_mosquitto(), "-c", conf], log)
    wait_for_port(port, "mosquitto", alive=lambda: proc.poll() is None)
    return port, out / "credentials"


@dataclass(frozen=True)
class FleetServer:
    """Where the running fleet server answers."""

    url: str
    token_file: Path
    db: Path


def register_devices(db: Path, devices: Sequence[Device]) -> None:
    """Enrol the devices in the fleet server's registry with their labels and profile (rollout waves
    pick canaries by the registry's labels), before the server starts."""
    store = Store(db)
    try:
        for dev in devices:
            store.register_device(dev.id, labels=dev.labels, profile=dev.profile)
    finally:
        store.close()


def start_fleet_server(children: Children, work: Path, *, broker_port: int, credentials: Path,
                       mirror_url: str, trust: Sequence[str], db: Path, log: Path,
                       webhook: tuple[str, bytes] | None = None) -> FleetServer:
    """Start ``fleet-server`` (SQLite store, HTTP on a free port with an admin token, the Git watcher on
    the mirror with the operators' keys, 2 of 2; with ``webhook`` (URL, secret) every notification
    signed to that receiver) and wait until it answers.

    Raises:
        DemoError: it did not start.
    """
    http_port = free_port()
    token = work / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    cfg = {
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "username": "fleet-server",
                 "password_file": str(credentials / "fleet-server.password"), "keepalive": 5},
        "store": {"path": str(db)},
        "http": {"host": "127.0.0.1", "port": http_port, "admin_token_file": str(token)},
        "git": {"url": mirror_url, "branch": "main", "poll_interval": "1h",
                "cache_dir": str(work / "git-cache"), "trust": {"keys": list(trust), "threshold": 2}},
        "log_level": "warning",
    }
    if webhook is not None:
        secret = work / "webhook.secret"
        secret.write_bytes(webhook[1] + b"\n")
        secret.chmod(0o600)
        cfg["notifications"] = [{"name": "demo", "url": webhook[0], "events": ["*"],
                                 "secret_file": str(secret), "timeout": "2s"}]
    config = work / "server.json"
    config.write_text(json.dumps(cfg, indent=2))
    proc = children.start("fleet-server", "server", [BIN / "fleet-server", "--config", config],
                          log)
    wait_for_port(http_port, "fleet-server", timeout=30, alive=lambda: proc.poll() is None)
    return FleetServer(f"http://127.0.0.1:{http_port}", token, db)


class Device:
    """One simulated device: agent.yaml, root directory, state directory and stand-in tools."""

    def __init__(self, base: Path, device_id: str, labels: dict[str, str], profile: str = "gateway") -> None:
        self.id = device_id
        self.dir = base / device_id
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.config = self.dir / "agent.yaml"
        self.labels = labels
        self.profile = profile
        self.bin = self.dir / "bin"
        self.root.mkdir(parents=True)
        write_standins(self.bin, self.dir / "system.json", self.dir / "system-calls.jsonl")
        sysstate = json.loads((self.dir / "system.json").read_text())
        sysstate["sysctl"] = {"net.ipv4.ip_forward": "0", "net.core.somaxconn": "4096"}
        sysstate["unit_dirs"] = [str(self.root / "etc/systemd/system")]
        (self.dir / "system.json").write_text(json.dumps(sysstate))

    @property
    def env(self) -> dict[str, str]:
        """The environment of this device's processes: its stand-in tools first on PATH."""
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    def write_config(self, url: str, trust: Sequence[str], *, broker_port: int, credentials: Path) -> None:
        """Write this device's agent.yaml: the mirror, 2-of-2 trust, its MQTT credentials, a long poll
        (nudges and assignments drive it), drift checks every 5 s, health every 5 s."""
        cfg = {
            "device_id": self.id, "labels": self.labels, "profile": self.profile,
            "profile_dirs": [str(REPO / "device_profiles")],
            "repo": {"url": url, "branch": "main", "timeout": "10s"},
            "trust": {"keys": list(trust), "threshold": 2},
            "mqtt": {"host": "127.0.0.1", "port": broker_port, "username": self.id,
                     "password_file": str(credentials / f"{self.id}.password"), "keepalive": 5},
            "intervals": {"poll": "1h", "drift": "5s", "health": "5s"},
            "backoff": {"base": "200ms", "cap": "2s"},
            "root": str(self.root), "state_dir": str(self.state), "log_level": "warning",
        }
        self.config.write_text(json.dumps(cfg, indent=2))

    def agent(self, *args: str, check: bool = False) -> tuple[int, str, str]:
        """Run ``edge-agent ARGS --config <this device>`` once; return (exit code, stdout, stderr).

        Raises:
            DemoError: it failed while ``check`` is set.
        """
        proc = run_tool([BIN / "edge-agent", *args, "--config", self.config], env=self.env, check=check)
        return proc.returncode, proc.stdout, proc.stderr

    def start(self, children: Children) -> None:
        """Start this device's daemon (``edge-agent run``), logging to its directory."""
        children.start(self.id, "agents", [BIN / "edge-agent", "run", "--config", self.config],
                       self.dir / "agent.log", env=self.env)

    def read(self, path: str) -> str:
        """Return a file of the device's root as text ('' when missing)."""
        try:
            return (self.root / path.lstrip("/")).read_text()
        except OSError:
            return ""
