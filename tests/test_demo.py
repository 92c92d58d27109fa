"""The README's one-command demo, run for real as ``make demo`` runs it: ``python -m demo.run``.

The whole story (git daemon, Mosquitto, fleet-server, 20 edge-agent processes, three rollouts, a
refused push, drift) must finish with exit 0, narrate each step, and leave no process behind.
Interrupted in the middle (SIGINT, as Ctrl-C), it must stop every process it started and exit 130.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.broker import mosquitto_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(280)]

REPO = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict[str, str]:
    # The demo's working directory (tempfile.mkdtemp) then lives under tmp_path, so leftovers show.
    return {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def _processes_mentioning(text: str) -> list[str]:
    """Return the command lines of running processes that mention ``text`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _assert_clean(tmp_path: Path) -> None:
    deadline = time.monotonic() + 5
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.glob("edge-fleet-demo-*")) == []


def test_demo_runs_the_whole_story_with_20_devices_and_cleans_up(tmp_path: Path) -> None:
    mosquitto_binary()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "demo.run", "--exit-when-done", "--devices", "20"],
                          cwd=REPO, env=_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=240, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout
    print(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.splitlines()
    assert len(lines) < 70, "the narration should stay short"
    assert "signed by alice and bob" in out
    assert "password + ACL per device" in out
    assert "20 edge-agent daemons online" in out
    # release 1 and release 2 go through every wave; release 3 fails at the canaries and is undone
    assert out.count("phase succeeded") == 2
    assert out.count("wave 3 (everyone) needs approval before it starts: fleetctl rollout promote") == 2
    assert "release 1 on 20/20 devices" in out
    assert "release 2 on 20/20 devices" in out
    assert "phase rolled_back" in out
    assert "wave 1 (canary) failed" in out
    assert "later waves never got release 3: 20/20 devices run release 2" in out
    bad = out[out.index(" 9. bad"):out.index("10. drift")]
    canary_line = bad.splitlines()[1]
    assert "wave 1 canary" in canary_line
    assert re.search(r"failed [1-9]", canary_line), canary_line
    # the unsigned push: refused by the server and by the device, which stayed as it was
    assert "the server's Git watcher refused it" in out
    assert "told to apply it: refused, its files unchanged" in out
    assert "drift_corrected" in out
    # the remote pause, reported by the device and audited
    assert "applies nothing, keeps reporting 'fleet server: demo: hands off'" in out
    assert "the audit log has device.pause, device.resume" in out
    # release 4's preflight: every gateway would refuse /srv, so the rollout stops before any change
    assert "20 of 20 devices would refuse: /srv/edge/notes.txt is outside the allowed roots" in out
    assert "aborted before any device changed: 20/20 devices still run release 2" in out
    # a device without mirror or broker, updated from a file
    assert "edge-agent import -> applied, /etc/motd says 'managed by edge-fleet, release 2'" in out
    # every notification reached the receiver signed
    webhooks = out[out.index("14. webhooks"):out.index("15. summary")]
    assert "(0 refused)" in webhooks
    assert "rollout.preflight 1" in webhooks
    assert "rollout.rolled_back 1" in webhooks
    assert "fleetctl devices --json: release 2, in_sync: 20; online 20/20" in out
    assert "dashboard http://127.0.0.1:" in out
    assert elapsed < 180, f"the demo took {elapsed:.0f} s"
    _assert_clean(tmp_path)


def test_interrupting_the_demo_stops_every_process_it_started(tmp_path: Path) -> None:
    mosquitto_binary()
    out_file = tmp_path / "demo.out"
    with out_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "demo.run", "--devices", "4"], cwd=REPO,
                                env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while " 5. devices" not in out_file.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, out_file.read_text()
            time.sleep(0.2)
        assert proc.poll() is None, out_file.read_text()
        assert len(_processes_mentioning(str(tmp_path))) >= 7  # git daemon, broker, server, 4 agents
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, out_file.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _assert_clean(tmp_path)


def test_demo_without_a_terminal_stays_up_until_sigterm(tmp_path: Path) -> None:
    """Started with no terminal (stdin /dev/null, output to a file), as `nohup make demo &` or a
    service would run it, the demo keeps the fleet running after the story, names its pid, and a
    SIGTERM to that pid stops every process and exits 0."""
    mosquitto_binary()
    out_file = tmp_path / "demo.out"
    with out_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "demo.run", "--devices", "4"], cwd=REPO,
                                env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 200
        while "The fleet keeps running" not in out_file.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, out_file.read_text()
            time.sleep(0.2)
        text = out_file.read_text()
        assert proc.poll() is None, f"the demo exited without a terminal:\n{text}"
        assert f"kill {proc.pid}`" in text
        time.sleep(1)
        assert proc.poll() is None, out_file.read_text()
        assert len(_processes_mentioning(str(tmp_path))) >= 7  # git daemon, broker, server, 4 agents
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out_file.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _assert_clean(tmp_path)
