"""The agent over MQTT in tests: its config with an ``mqtt`` section, the daemon in a thread, and
readers of what a ``mosquitto_sub`` watcher received from it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import yaml

from edge_agent.config import AgentConfig, load_config
from edge_agent.daemon import Daemon
from edge_core import messages
from tests.support.agent_fleet import AgentFleet
from tests.support.broker import Subscriber

DEVICE = "dev-1"
PREFIX = "fleet/v1"
ALL = f"{PREFIX}/{DEVICE}/#"


def mqtt_config(fleet: AgentFleet, port: int, *, poll: str = "1h", health: str = "1h") -> AgentConfig:
    """The fleet's agent.yaml with an mqtt section and the given intervals."""
    data: dict[str, Any] = yaml.safe_load(fleet.config_path.read_text())
    data["mqtt"] = {"host": "127.0.0.1", "port": port, "keepalive": 5}
    data["intervals"] = {"poll": poll, "drift": "1h", "health": health}
    fleet.config_path.write_text(yaml.safe_dump(data))
    return load_config(fleet.config_path)


class RunningAgent:
    """A :class:`Daemon` running in a thread; ``stop()`` sets its stop event and joins it (bounded)."""

    def __init__(self, config: AgentConfig) -> None:
        self.stop_event = threading.Event()
        self.daemon = Daemon(config, stop=self.stop_event)
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:  # surfaced by stop()
            self.error.append(exc)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the daemon did not stop"
        assert not self.error, self.error


def kind_of(topic: str) -> str:
    return topic.rsplit("/", 1)[1]


def decoded(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    """Every message of ``kind`` the subscriber got, decoded by the strict decoder."""
    out = []
    for r in sub.messages(f"{PREFIX}/{DEVICE}/{kind}"):
        out.append(messages.decode(kind, r.payload, topic_device=DEVICE))
    return out


def events(sub: Subscriber, type_: str | None = None) -> list[dict[str, Any]]:
    return [e for e in decoded(sub, "events") if type_ is None or e["type"] == type_]


def has_event(type_: str, commit: str | None = None) -> Callable[[Subscriber], bool]:
    return lambda s: any(commit is None or e["commit"] == commit for e in events(s, type_))
