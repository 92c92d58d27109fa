"""The command runner: argv and shell forms, env and cwd, output caps, timeouts that kill the group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_agent.errors import ApplyError
from edge_agent.runner import OUTPUT_CAP, Runner


def test_argv_runs_without_a_shell_and_reports_output() -> None:
    result = Runner().run(["printf", "%s|", "a b", "$HOME"], timeout=10)
    assert result.ok
    assert result.stdout == "a b|$HOME|"
    assert result.stderr == ""


def test_string_runs_through_sh_with_env_and_cwd(tmp_path: Path) -> None:
    result = Runner().run('echo "$EDGE_X $(pwd)"; echo oops >&2; exit 3', timeout=10,
                          env={"EDGE_X": "hello"}, cwd=tmp_path)
    assert result.returncode == 3
    assert not result.ok
    assert result.stdout.strip() == f"hello {tmp_path}"
    assert result.last_error_line() == "oops"


def test_env_adds_to_the_inherited_environment() -> None:
    result = Runner().run(["sh", "-c", 'echo "$PATH"'], timeout=10, env={"EXTRA": "1"})
    assert result.stdout.strip() == os.environ["PATH"]


def test_output_is_capped() -> None:
    result = Runner().run(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"], timeout=10)
    assert result.ok
    assert len(result.stdout) == OUTPUT_CAP


def test_missing_program_is_an_apply_error(tmp_path: Path) -> None:
    with pytest.raises(ApplyError, match="cannot run"):
        Runner().run([str(tmp_path / "no-such-program")], timeout=5)


def test_which_finds_programs_on_path() -> None:
    assert Runner.which("sh") is not None
    assert Runner.which("no-such-program-edge-fleet") is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie not yet reaped by init counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    result = Runner().run(f"sleep 30 & echo $! > {pidfile}; wait", timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert not result.ok
    assert elapsed < 5
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child), "the background sleep survived the timeout"


def test_background_child_holding_output_does_not_block(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    started = time.monotonic()
    result = Runner().run(f"sleep 30 & echo $! > {pidfile}; echo done", timeout=10)
    try:
        assert result.ok
        assert result.stdout.strip() == "done"
        assert time.monotonic() - started < 5
    finally:
        os.kill(int(pidfile.read_text()), 9)
