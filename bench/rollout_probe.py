"""The measuring side of the rollout benchmark: a real ``fleet-server`` process, and a sampler that
times the API calls an operator makes while a rollout runs.

:class:`ServerProcess` starts ``python -m fleet_server.main`` on a generated configuration (the
embedded SQLite default, or a PostgreSQL that several replicas share; 127.0.0.1 only), reads the CPU time and memory of it and its ingest
processes (``ingest.processes``) from ``/proc``, and stops it by pid (SIGTERM, then SIGKILL after a bound). :class:`Sampler` calls, once a second, the first
page of ``GET /api/v1/devices``, the dashboard's ``GET /api/v1/summary``, ``GET
/api/v1/rollouts/{id}`` (what ``fleetctl rollout status ID`` and ``watch`` read) and ``/healthz``
(the ingest backlog age), and keeps every latency, lag and RSS sample.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.config import StoreConfig

__all__ = ["DeliveryProbe", "Sampler", "ServerProcess", "p95", "scrape"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CALL_TIMEOUT = 10.0


def p95(values: list[float]) -> float | None:
    """Return the 95th percentile (nearest rank) of ``values``, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def scrape(url: str, token: str | None = None) -> dict[str, float]:
    """Return every sample of ``GET /metrics`` as ``name{label=value,...}`` -> value."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30.0).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


class ServerProcess:
    """A ``fleet-server`` process on a configuration written into ``workdir``.

    Args:
        workdir: where the configuration, the database (SQLite), the admin token and the log live.
        mqtt_port: the broker's port on 127.0.0.1.
        http_port: the API's port on 127.0.0.1.
        ingest_processes: ``ingest.processes`` (None: the server's default).
        store: the store (None: SQLite in ``workdir``); several processes share a PostgreSQL one.
        name: this process's name: its MQTT client id, configuration and log file names.
        share_group: ``mqtt.share_group`` (replicas split the reports), or None.
    """

    def __init__(self, workdir: Path, mqtt_port: int, http_port: int, ingest_processes: int | None = None, *,
                 store: StoreConfig | None = None, name: str = "bench-server",
                 share_group: str | None = None) -> None:
        self.workdir = workdir
        self.db = workdir / "fleet.db"
        self.store = store or StoreConfig(path=self.db)
        self.token = "bench-admin-token"
        self.url = f"http://127.0.0.1:{http_port}"
        token_file = workdir / "admin.token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        if self.store.backend == "sqlite":
            store_lines = f"store:\n  path: {self.store.path}\n"
        else:
            store_lines = f"store:\n  url: {self.store.url}\n  password_file: {self.store.password_file}\n"
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(
            f"mqtt:\n  host: 127.0.0.1\n  port: {mqtt_port}\n  client_id: {name}\n"
            + (f"  share_group: {share_group}\n" if share_group else "")
            + store_lines
            + f"http:\n  host: 127.0.0.1\n  port: {http_port}\n  admin_token_file: {token_file}\n"
            "log_level: warning\n"
            + ("" if ingest_processes is None else f"ingest:\n  processes: {ingest_processes}\n"))
        self.log = workdir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def role(self) -> str | None:
        """This process's ``role`` in ``/healthz`` (``leader`` or ``follower``), None when it does not answer."""
        try:
            role = httpx.get(f"{self.url}/healthz", timeout=2.0).json().get("role")
        except (httpx.HTTPError, ValueError):
            return None
        return str(role) if role is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait (bounded) until ``/healthz`` says ok (connected to the broker).

        Raises:
            RuntimeError: it exited or did not become healthy in time.
        """
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "fleet_server.main", "--config", str(self.config)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fleet-server exited with {self._proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"fleet-server not healthy within {timeout:g}s; see {self.log}")

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None
        return self._proc.pid

    def pids(self) -> list[int]:
        """The server's process id, then those of its running child processes (the ingest processes)."""
        children: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                children.extend(int(p) for p in (task / "children").read_text().split())
        return [self.pid, *sorted(set(children))]

    def cpu_seconds(self, *, main_only: bool = False) -> float:
        """User + system CPU seconds the server used so far (its threads included), with its running
        ingest processes' unless ``main_only``."""
        total = 0.0
        for pid in [self.pid] if main_only else self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        return total

    def _status_kib(self, key: str, main_only: bool) -> float:
        total = 0.0
        for pid in [self.pid] if main_only else self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += float(line.split()[1])
        return total

    def rss_mib(self, *, main_only: bool = False) -> float:
        """The resident memory of the server and its ingest processes now (or the server's alone), MiB."""
        return self._status_kib("VmRSS", main_only) / 1024

    def rss_peak_mib(self, *, main_only: bool = False) -> float:
        """The sum of the peak resident memory (VmHWM) of the server and its running ingest processes
        (or the server's alone), in MiB."""
        return self._status_kib("VmHWM", main_only) / 1024

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after 30 s; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10.0)


class Sampler:
    """Once a second: the latency of three API reads, the ingest backlog age, the phase, the RSS.

    Args:
        server: the server to sample.
        rollout_id: the rollout whose summary is read.
        others: the other replicas, whose ingest backlog age counts too (the largest is kept).
    """

    def __init__(self, server: ServerProcess, rollout_id: str, others: list[ServerProcess] | None = None) -> None:
        self.server = server
        self.others = others or []
        self.rollout_id = rollout_id
        self.latency: dict[str, list[float]] = {"devices": [], "summary": [], "rollout": []}
        self.errors: dict[str, int] = {"devices": 0, "summary": 0, "rollout": 0}
        self.lag: list[float] = []
        self.rss: list[float] = []
        self.phase = "pending"
        self.detail: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._http = httpx.Client(base_url=server.url, timeout=_CALL_TIMEOUT,
                                  headers={"Authorization": f"Bearer {server.token}"})

    def _timed(self, name: str, path: str) -> Any:
        t0 = time.perf_counter()
        try:
            answer = self._http.get(path)
            body = answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            body = None
        self.latency[name].append(time.perf_counter() - t0)
        if body is None:
            self.errors[name] += 1
        return body

    def sample(self) -> None:
        """Take one sample of everything."""
        self._timed("devices", "/api/v1/devices?limit=100")
        self._timed("summary", "/api/v1/summary")
        detail = self._timed("rollout", f"/api/v1/rollouts/{self.rollout_id}")
        if isinstance(detail, dict):
            self.detail = detail
            self.phase = str(detail.get("phase"))
        lags = []
        for url in [self.server.url, *(o.url for o in self.others)]:
            try:
                health = self._http.get(f"{url}/healthz").json()
                lags.append(float(health.get("ingest_backlog_seconds", 0.0)))
            except (httpx.HTTPError, ValueError):
                pass
        if lags:
            self.lag.append(max(lags))
        with contextlib.suppress(OSError):
            self.rss.append(self.server.rss_mib())

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def start(self) -> None:
        """Start sampling in a thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (bounded wait) and close the HTTP client."""
        self._stop.set()
        self._thread.join(3 * _CALL_TIMEOUT + 5)
        self._http.close()


class DeliveryProbe:
    """An idle MQTT subscriber to every report of a sample of the simulated devices: how long a
    report takes from the device (its ``ts``) to a subscriber that keeps up, to set beside the fleet
    server's own send-to-receipt delay. The difference is the server's: the time its reports wait at
    the broker or in its socket before it reads them.

    Args:
        port: the broker's port on 127.0.0.1.
        devices: the device ids to follow.
        prefix: the topic prefix.
    """

    def __init__(self, port: int, devices: list[str], prefix: str) -> None:
        self.delays: list[float] = []
        self.devices = len(devices)
        self._lock = threading.Lock()
        self._topics = [(f"{prefix}/{d}/{kind}", 0) for d in devices for kind in ("status", "health", "events")]
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-delivery-probe")
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=60)
        self._client.loop_start()
        self._client.subscribe(self._topics)

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        if msg.retain:
            return
        received = time.time()
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            ts = datetime.fromisoformat(str(json.loads(msg.payload)["ts"]).replace("Z", "+00:00")).timestamp()
            with self._lock:
                self.delays.append(received - ts)

    def figures(self) -> dict[str, float | int | None]:
        """The p95 delay (seconds), the share over 5 s, how many reports were seen, of how many devices."""
        with self._lock:
            delays = list(self.delays)
        late = sum(1 for d in delays if d > 5.0)
        return {"p95_seconds": None if not delays else round(p95(delays) or 0.0, 2),
                "over_5s_share": None if not delays else round(late / len(delays), 4), "reports": len(delays),
                "devices": self.devices}

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()
