"""The whole chain with every part real and separate: `fleet-server` (on each store backend) and
three `edge-agent run` processes talk through a real Mosquitto; the server watches a real
`git daemon` mirror; the operator signs with `fleetctl` and reads the fleet back with
`fleetctl devices`.

A signed push is seen by the server's Git watcher, which nudges the fleet; every device applies the
release at once (the agents' poll interval is an hour) and reports it; the server's registry, its
HTTP API and `fleetctl devices --json` show every device on that release, in sync, online.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet_server.config import StoreConfig
from tests.support.broker import Mosquitto
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.mirror import GitDaemon, free_port, wait_for_port
from tests.support.stores import store_section
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEVICES = ("gw-1", "gw-2", "gw-3")



class Proc:
    """A child process stopped by pid (SIGTERM, then SIGKILL) at the end of the test."""

    def __init__(self, argv: list[str | Path], log: Path) -> None:
        self.log = log
        self.fh = log.open("wb")
        self.p = subprocess.Popen([str(a) for a in argv], stdout=self.fh, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=5)
        self.fh.close()
        return self.p.returncode


def fleetctl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetctl"), *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=60)


def release_files(version_text: str) -> dict[str, str]:
    bundle = {
        "targets": [{"labels": {"role": "gateway"}}],
        "resources": [{"kind": "file", "path": "/etc/motd", "content": version_text, "mode": "0644"}],
        # the gateway profile runs no command of the release, health checks included
        "health": [{"kind": "disk_free", "name": "root-free", "path": "/", "min_free_percent": 0,
                    "timeout": 5}],
    }
    return {"fleet.yaml": "description: e2e fleet\n", "bundles/motd/bundle.yaml": yaml.safe_dump(bundle)}


@pytest.fixture
def world(tmp_path: Path, store_config: StoreConfig) -> Iterator[dict[str, Any]]:
    key = tmp_path / "operator.key"
    pub = fleetctl("keys", "generate", "--out", key).stdout.strip()
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    bare = make_bare(mirrors / "fleet.git")
    work = WorkRepo.create(tmp_path / "work")
    procs: list[Proc] = []
    with GitDaemon(mirrors) as daemon, Mosquitto(tmp_path / "mosquitto") as broker:
        http_port = free_port()
        token = tmp_path / "admin.token"
        token.write_text("e2e-admin-token\n")
        token.chmod(0o600)
        server_cfg = {
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5},
            "store": store_section(store_config),
            "http": {"host": "127.0.0.1", "port": http_port, "admin_token_file": str(token)},
            "git": {"url": daemon.url("fleet.git"), "branch": "main", "poll_interval": "1h",
                    "cache_dir": str(tmp_path / "server-git"), "trust": {"keys": [pub], "threshold": 1}},
        }
        (tmp_path / "server.yaml").write_text(yaml.safe_dump(server_cfg))
        server = Proc([BIN / "fleet-server", "--config", tmp_path / "server.yaml"], tmp_path / "server.log")
        procs.append(server)
        wait_for_port(http_port, timeout=20)
        for dev in DEVICES:
            d = tmp_path / dev
            (d / "root").mkdir(parents=True)
            cfg = {"device_id": dev, "labels": {"role": "gateway"}, "profile": "gateway",
                   "profile_dirs": [str(REPO / "device_profiles")],
                   "repo": {"url": daemon.url("fleet.git"), "timeout": "5s"},
                   "trust": {"keys": [pub]},
                   "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5},
                   "intervals": {"poll": "1h", "drift": "1h", "health": "2s"},
                   "root": str(d / "root"), "state_dir": str(d / "state")}
            (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
            procs.append(Proc([BIN / "edge-agent", "run", "--config", d / "agent.yaml"], d / "agent.log"))
        try:
            yield {"tmp": tmp_path, "key": key, "work": work, "bare": bare, "http": http_port,
                   "token": token, "server": server}
        finally:
            for p in reversed(procs):
                p.stop()


def api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def publish_release(world: dict[str, Any], text: str) -> str:
    work: WorkRepo = world["work"]
    for path, content in release_files(text).items():
        work.write(path, content)
    signed = fleetctl("release", "sign", work.path, "--key", world["key"])
    assert signed.returncode == 0, signed.stderr
    return work.commit_and_push(world["bare"], {})


def test_signed_push_reaches_every_device_and_the_registry(world: dict[str, Any]) -> None:
    port = world["http"]
    wait_until(lambda: {d["id"] for d in api(port, "/api/v1/devices")["devices"]} >= set(DEVICES),
               "every agent to register through its reports")

    commit = publish_release(world, "release one\n")
    hook = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/hooks/git", data=b"{}", method="POST",
                                  headers={"Authorization": "Bearer e2e-admin-token"})
    t0 = time.monotonic()
    with urllib.request.urlopen(hook, timeout=10) as resp:
        assert resp.status in (200, 202)

    def all_applied() -> bool:
        devices = {d["id"]: d for d in api(port, "/api/v1/devices")["devices"]}
        return all(devices.get(x, {}).get("revision") == commit and devices[x].get("sync_state") == "in_sync"
                   for x in DEVICES)

    wait_until(all_applied, "every device to apply and report the pushed release", timeout=30)
    elapsed = time.monotonic() - t0
    print(f"webhook -> every device applied and registered: {elapsed:.2f} s")
    for dev in DEVICES:
        assert (world["tmp"] / dev / "root/etc/motd").read_text() == "release one\n"

    detail = api(port, f"/api/v1/devices/{DEVICES[0]}")
    assert any(e["type"] == "sync_succeeded" and e["commit"] == commit for e in detail["events"])
    wait_until(lambda: bool(api(port, f"/api/v1/devices/{DEVICES[0]}").get("health")),
               "a health sample", timeout=30)

    out = fleetctl("devices", "--server", f"http://127.0.0.1:{port}", "--json")
    assert out.returncode == 0, out.stderr
    listed = {d["id"]: d for d in json.loads(out.stdout)["devices"]}
    assert all(listed[x]["online"] and listed[x]["release"] == 1 for x in DEVICES)
    table = fleetctl("devices", "--server", f"http://127.0.0.1:{port}")
    assert all(x in table.stdout for x in DEVICES)

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "fleet_messages_ingested_total" in metrics
