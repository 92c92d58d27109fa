"""Devices whose agent daemon runs in a thread, and the releases a rollout test publishes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml

from edge_agent.config import AgentConfig, load_config
from edge_agent.daemon import Daemon
from edge_core.trust.keys import format_verify_key
from tests.support.agent_fleet import PROFILE, AgentFleet


def release_files(version: int, failing: dict[str, str] | None = None) -> dict[str, str]:
    """Release ``version``: a file naming it on every device, plus a bundle whose health check fails
    on the devices with the labels in ``failing``."""
    files = {
        "fleet.yaml": "description: rollout test fleet\n",
        "bundles/app/bundle.yaml": yaml.safe_dump({
            "targets": [{"labels": {"role": "gateway"}}],
            "resources": [{"kind": "file", "path": "/etc/app/release", "content": f"{version}\n",
                           "mode": "0644"}],
            "health": [{"kind": "command", "name": "ok", "run": ["true"], "timeout": 5}],
        }, sort_keys=False),
    }
    if failing:
        files["bundles/bad/bundle.yaml"] = yaml.safe_dump({
            "targets": [{"labels": failing}],
            "resources": [{"kind": "file", "path": "/etc/app/bad", "content": "x\n", "mode": "0644"}],
            "health": [{"kind": "command", "name": "bad", "run": ["false"], "timeout": 5}],
        }, sort_keys=False)
    return files


class Agent:
    """One device: its own directory (config, root, state) and the daemon in a thread."""

    def __init__(self, base: Path, device_id: str, labels: dict[str, str], repo: AgentFleet,
                 port: int) -> None:
        self.id = device_id
        self.labels = {"role": "gateway", **labels}
        self.dir = base / device_id
        self.root = self.dir / "root"
        for d in ("etc", "opt", "srv"):
            (self.root / d).mkdir(parents=True)
        (self.dir / "profiles").mkdir()
        (self.dir / "profiles" / "test-device.yaml").write_text(yaml.safe_dump(PROFILE))
        data: dict[str, Any] = {
            "device_id": device_id, "labels": self.labels, "profile": "test-device",
            "profile_dirs": ["profiles"],
            "repo": {"url": repo.daemon.url("fleet.git"), "timeout": "5s"},
            "trust": {"keys": [format_verify_key(repo.key.verify_key)]},
            "mode": "enforce", "root": "root", "state_dir": "state",
            "backoff": {"base": "100ms", "cap": "1s"},
            "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5},
            "intervals": {"poll": "1h", "drift": "1h", "health": "1h"},
        }
        (self.dir / "agent.yaml").write_text(yaml.safe_dump(data))
        self.config: AgentConfig = load_config(self.dir / "agent.yaml")
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def start(self) -> None:
        self._stop = threading.Event()
        daemon = Daemon(self.config, stop=self._stop)
        self._thread = threading.Thread(target=self._run, args=(daemon,), name=f"agent-{self.id}",
                                        daemon=True)
        self._thread.start()

    def _run(self, daemon: Daemon) -> None:
        try:
            daemon.run()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        if self._stop is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), f"agent {self.id} did not stop"
        self._stop = self._thread = None
        assert not self.errors, self.errors

    def release(self) -> int | None:
        path = self.root / "etc" / "app" / "release"
        return int(path.read_text()) if path.exists() else None
