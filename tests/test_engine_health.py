"""Health checks: timeouts enforced, real sockets and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import telemetry
from edge_agent.engine.health import CheckResult, failed_checks, run_check, run_checks
from edge_agent.runner import Runner
from edge_core.resources import (
    CommandCheck,
    DiskFreeCheck,
    HttpCheck,
    MemoryCheck,
    SystemdActiveCheck,
    TcpCheck,
    TemperatureCheck,
)


@pytest.fixture
def runner() -> Runner:
    return Runner()


def test_command_check_ok_and_failing(runner: Runner, tmp_path: Path) -> None:
    results = run_checks(
        [("web", CommandCheck(name="yes", run=("true",), timeout=5)),
         ("web", CommandCheck(name="no", run="echo broken >&2; exit 3", timeout=5))],
        runner, tmp_path)
    assert [r.ok for r in results] == [True, False]
    assert results[0] == CheckResult("web", "yes", "command", True, "exit status 0", results[0].duration)
    assert "exit status 3" in results[1].detail
    assert "broken" in results[1].detail
    assert [r.name for r in failed_checks(results)] == ["no"]


def test_command_check_timeout_is_enforced(runner: Runner, tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_check("b", CommandCheck(name="slow", run=("sleep", "30"), timeout=0.5), runner, tmp_path)
    elapsed = time.monotonic() - start
    assert not result.ok
    assert "timed out" in result.detail
    assert elapsed < 2.0


def test_missing_command_fails_without_raising(runner: Runner, tmp_path: Path) -> None:
    result = run_check("b", CommandCheck(name="nope", run=("/nonexistent/cmd",), timeout=2), runner, tmp_path)
    assert not result.ok


def test_tcp_check_listening_and_closed(tmp_path: Path, runner: Runner) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        ok = run_check("b", TcpCheck(name="up", host="127.0.0.1", port=port, timeout=2), runner, tmp_path)
    finally:
        listener.close()
    assert ok.ok, ok.detail
    # the same port, now closed: connection refused
    closed = run_check("b", TcpCheck(name="down", host="127.0.0.1", port=port, timeout=2), runner, tmp_path)
    assert not closed.ok
    assert f"127.0.0.1:{port}" in closed.detail


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/ok":
            self.send_response(200)
        elif self.path == "/same-host-redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
        elif self.path == "/foreign-redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2:9/elsewhere")
        elif self.path == "/slow":
            time.sleep(3)
            self.send_response(200)
        else:
            self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_http_check_statuses(http_server: str, runner: Runner, tmp_path: Path) -> None:
    checks = [
        ("b", HttpCheck(name="ok", url=f"{http_server}/ok", timeout=3)),
        ("b", HttpCheck(name="down", url=f"{http_server}/down", timeout=3)),
        ("b", HttpCheck(name="expect503", url=f"{http_server}/down", expect_status=503, timeout=3)),
        ("b", HttpCheck(name="redirect", url=f"{http_server}/same-host-redirect", timeout=3)),
        ("b", HttpCheck(name="foreign", url=f"{http_server}/foreign-redirect", timeout=3)),
    ]
    results = {r.name: r for r in run_checks(checks, runner, tmp_path)}
    assert results["ok"].ok, results["ok"].detail
    assert not results["down"].ok
    assert "503" in results["down"].detail
    assert results["expect503"].ok
    assert results["redirect"].ok, results["redirect"].detail
    assert not results["foreign"].ok
    assert "302" in results["foreign"].detail


def test_http_check_timeout(http_server: str, runner: Runner, tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_check("b", HttpCheck(name="slow", url=f"{http_server}/slow", timeout=0.5), runner, tmp_path)
    assert not result.ok
    assert time.monotonic() - start < 1.5


def test_disk_free_uses_device_path_under_root(runner: Runner, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    _total, _free, pct = telemetry.disk_usage(tmp_path)
    good = run_check("b", DiskFreeCheck(name="disk", path="/var", min_free_percent=0.0), runner, tmp_path)
    assert good.ok, good.detail
    assert "/var" in good.detail
    impossible = run_check("b", DiskFreeCheck(name="disk", path="/var", min_free_percent=100.0), runner,
                           tmp_path)
    assert impossible.ok is (pct >= 100.0)
    missing = run_check("b", DiskFreeCheck(name="disk", path="/no/such/dir"), runner, tmp_path)
    assert not missing.ok


def test_memory_and_temperature_thresholds(runner: Runner, tmp_path: Path) -> None:
    used = telemetry.memory_percent()
    assert 0.0 <= used <= 100.0
    assert run_check("b", MemoryCheck(name="m", max_used_percent=100.0), runner, tmp_path).ok
    low = run_check("b", MemoryCheck(name="m", max_used_percent=0.0), runner, tmp_path)
    assert low.ok is (used <= 0.0)
    temps = telemetry.temperatures()
    hot = run_check("b", TemperatureCheck(name="t", max_celsius=-273.0), runner, tmp_path)
    assert hot.ok is (not temps)


def _fake_systemctl(bin_dir: Path, active_units: set[str]) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "systemctl"
    units = " ".join(sorted(active_units))
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"active = set({units!r}.split())\n"
        "args = sys.argv[1:]\n"
        "sys.exit(0 if args[:3] == ['is-active', '--quiet', '--'] and args[3] in active else 3)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_systemd_active_uses_systemctl(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_systemctl(tmp_path / "bin", {"web.service"})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    up = run_check("b", SystemdActiveCheck(name="s", unit="web.service", timeout=5), runner, tmp_path)
    down = run_check("b", SystemdActiveCheck(name="s", unit="db.service", timeout=5), runner, tmp_path)
    assert up.ok, up.detail
    assert not down.ok
    assert "db.service" in down.detail


def test_telemetry_sample_is_json_able(tmp_path: Path) -> None:
    snap = telemetry.sample([tmp_path, tmp_path / "missing"])
    json.dumps(snap)
    assert str(tmp_path) in snap["disk"]
    assert str(tmp_path / "missing") not in snap["disk"]
    assert snap["process"]["rss"] > 0
    assert snap["uptime"] > 0


def test_telemetry_sample_measures_the_agents_own_cpu_between_samples() -> None:
    telemetry.sample([])
    spent = time.process_time()
    while time.process_time() - spent < 0.3:  # bounded: 0.3 s of this process's CPU
        pass
    assert telemetry.sample([])["process"]["cpu_percent"] > 0.0
