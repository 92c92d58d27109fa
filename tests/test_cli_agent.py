"""The `edge-agent` command line: exit codes, one-line errors, JSON logs, and the daemon loop."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.agent import status
from edge_agent.cli import main
from edge_agent.daemon import Daemon
from edge_core.logs import JsonFormatter, log_context, setup_logging
from tests.support.agent_fleet import AgentFleet, base_release
from tests.support.wait import wait_until


def agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_version_and_help() -> None:
    proc = agent("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"edge-agent {__version__}"
    for cmd in ("init", "run", "sync", "plan", "status", "pause", "resume"):
        proc = agent(cmd, "--help")
        assert proc.returncode == 0, cmd
        assert "--config" in proc.stdout


def test_usage_error_exits_2() -> None:
    assert agent("frobnicate").returncode == 2
    assert agent("pause").returncode == 2  # --reason is required


def test_bad_config_is_one_line_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("device_id: a/b\nrepo: {url: 'git://127.0.0.1/x'}\n")
    proc = agent("status", "--config", str(cfg))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"edge-agent: {cfg}:1: device_id: must be 1-64 characters of "
                                   "A-Z a-z 0-9 . _ -")
    assert "Traceback" not in proc.stderr
    proc = agent("sync", "--once", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "cannot read" in proc.stderr


def test_init_prints_keys_and_keeps_them(fleet: AgentFleet, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--json", "--config", str(fleet.config_path)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["created"] is True
    assert first["signing_public"].startswith("ed25519:")
    assert first["encryption_public"].startswith("x25519:")
    assert main(["init", "--config", str(fleet.config_path)]) == 0
    out = capsys.readouterr().out
    assert "identity exists" in out
    assert first["encryption_public"] in out


def test_sync_plan_status_pause_resume(fleet: AgentFleet, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(fleet.config_path)
    fleet.publish(base_release(fleet.root))
    assert main(["plan", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "/etc/app/app.conf" in out
    assert not (fleet.root / "etc/app/app.conf").exists()
    assert main(["sync", "--once", "--json", "--config", cfg]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outcome"] == "applied"
    assert result["release"] == 1
    assert main(["status", "--json", "--config", cfg]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["installed"]["version"] == 1
    assert info["device"] == "dev-1"
    assert main(["status", "--config", cfg]) == 0
    assert "installed: release 1" in capsys.readouterr().out
    assert main(["pause", "--reason", "field work", "--config", cfg]) == 0
    capsys.readouterr()
    assert main(["sync", "--config", cfg]) == 0
    assert capsys.readouterr().out.startswith("paused")
    assert main(["resume", "--config", cfg]) == 0
    assert status(fleet.config)["paused"] is None


def test_refused_sync_exits_1_with_the_reason(fleet: AgentFleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.publish(base_release(fleet.root))
    fleet.push_unsigned({"bundles/app/files/app.conf": "evil\n"})
    assert main(["sync", "--once", "--config", str(fleet.config_path)]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("edge-agent:")]
    assert len(lines) == 1
    assert "refused" in lines[0]
    assert "app.conf" in lines[0]


def test_logs_are_json_lines_with_device_commit_release(fleet: AgentFleet) -> None:
    sha = fleet.publish(base_release(fleet.root))
    proc = agent("sync", "--once", "--config", str(fleet.config_path))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert records
    for rec in records:
        assert {"ts", "level", "logger", "msg"} <= set(rec)
        assert rec["device"] == "dev-1"
    assert any(rec.get("commit") == sha and rec.get("release") == 1 for rec in records)
    proc = agent("sync", "--once", "--config", str(fleet.config_path))
    assert proc.returncode == 0
    assert proc.stdout.startswith("noop")


def test_json_formatter_and_context() -> None:
    stream = io.StringIO()
    handler = setup_logging("debug", stream)
    log = logging.getLogger("edge_agent.test")
    with log_context(device="d1"), log_context(commit="abc", release=3):
        log.info("hello %s", "world")
    log.warning("outside")
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert lines[0]["msg"] == "hello world"
    assert (lines[0]["device"], lines[0]["commit"], lines[0]["release"]) == ("d1", "abc", 3)
    assert lines[0]["level"] == "info"
    assert "device" not in lines[1]
    assert isinstance(handler.formatter, JsonFormatter)


def test_daemon_syncs_on_nudge_and_corrects_drift(fleet: AgentFleet) -> None:
    cfg = fleet.write_config()
    cfg = type(cfg)(**{**cfg.__dict__, "intervals": type(cfg.intervals)(poll=3600.0, drift=0.3, health=60.0)})
    fleet.publish(base_release(fleet.root))
    stop = threading.Event()
    daemon = Daemon(cfg, stop=stop)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.last_result is not None and daemon.last_result.outcome == "applied",
                   "sync 1", 30.0)
        fleet.publish({"bundles/app/files/app.conf": "listen = 2\n"})
        daemon.request_sync()
        wait_until(lambda: daemon.last_result is not None and daemon.last_result.version == 2,
                   "nudged sync", 30.0)
        assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 2\n"
        (fleet.root / "etc/motd").write_text("drifted\n")
        # The check counts itself after it has rewritten the file: wait for both, not one then the other.
        wait_until(lambda: (fleet.root / "etc/motd").read_text() == "managed by edge-fleet\n"
                   and daemon.drift_checks >= 1, "drift fix", 30.0)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_run_stops_on_sigterm(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    argv = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(fleet.config_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (fleet.root / "etc/motd").exists():
            time.sleep(0.05)
        assert (fleet.root / "etc/motd").exists()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert any(json.loads(line).get("msg") == "agent stopped" for line in err.splitlines() if line.strip())
    assert status(fleet.config)["open_transaction"] is None
