"""The edge-fleet demo: the whole story on one machine with real parts, narrated.

Keys are generated, the example config repo is linted, signed (2 of 2) and pushed to a Git mirror
served by the real ``git daemon`` on loopback; a small fleet of devices (each an ``edge-agent``
with its own root directory and state) syncs it; a tampered push is refused without touching any
device; a release whose health check fails is rolled back on its own; drift made by hand is
corrected. ``systemctl``/``sysctl`` are stand-ins (the devices are directories, not machines).

Run with ``make demo`` (or ``python -m demo.run [--devices N] [--exit-when-done]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.standins import write_standins

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Demo Operator", "GIT_AUTHOR_EMAIL": "operator@example.invalid",
    "GIT_COMMITTER_NAME": "Demo Operator", "GIT_COMMITTER_EMAIL": "operator@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def say(text: str) -> None:
    """Print one narration line."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(argv: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command, capturing its output; raise with its stderr when it fails and must not."""
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=full_env, input=stdin, text=True,
                          capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: {' '.join(str(a) for a in argv[:3])} failed: {proc.stderr.strip()}")
    return proc


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def git_daemon(base: Path) -> Iterator[int]:
    """Serve the bare repositories under ``base`` with ``git daemon`` on loopback; yield its port."""
    port = free_port()
    pid_file = base / "git-daemon.pid"
    proc = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all", "--listen=127.0.0.1",
         f"--port={port}", f"--pid-file={pid_file}", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        else:
            raise SystemExit("demo: git daemon did not start")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gateway_app() -> Iterator[int]:
    """Listen on a free loopback port, playing the gateway application the health checks probe."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        yield int(srv.getsockname()[1])


class Device:
    """One simulated device: its agent.yaml, root directory, state directory and stand-in tools."""

    def __init__(self, base: Path, device_id: str, labels: dict[str, str], profile: str) -> None:
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

    def write_config(self, url: str, trust: list[str]) -> None:
        """Write this device's agent.yaml."""
        cfg = {
            "device_id": self.id, "labels": self.labels, "profile": self.profile,
            "profile_dirs": [str(REPO / "device_profiles")],
            "repo": {"url": url, "branch": "main", "timeout": "10s"},
            "trust": {"keys": trust, "threshold": 2},
            "root": str(self.root), "state_dir": str(self.state), "log_level": "warning",
        }
        self.config.write_text(json.dumps(cfg, indent=2))

    def agent(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``edge-agent ARGS --config <this device>``."""
        env = {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        return run([BIN / "edge-agent", *args, "--config", self.config], env=env, check=check)

    def sync(self) -> dict[str, object]:
        """Run one sync and return its JSON result."""
        proc = self.agent("sync", "--once", "--json")
        try:
            result: dict[str, object] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            result = {"outcome": "error", "reason": proc.stderr.strip().splitlines()[-1:] or ""}
        return result


def sync_all(devices: Sequence[Device]) -> dict[str, dict[str, object]]:
    """Sync every device (two at a time) and return id -> result."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((d.id for d in devices), pool.map(Device.sync, devices), strict=True))


def tally(results: dict[str, dict[str, object]]) -> str:
    """Summarise outcomes as 'applied ×5, noop ×1'."""
    counts: dict[str, int] = {}
    for r in results.values():
        counts[str(r.get("outcome"))] = counts.get(str(r.get("outcome")), 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def tree_digest(root: Path) -> dict[str, bytes]:
    """Return every regular file under ``root`` with its content (to show nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def commit_and_push(work: Path, message: str) -> str:
    """Commit everything in the work tree and push it to the mirror; return the commit id."""
    run(["git", "add", "-A"], cwd=work)
    run(["git", "commit", "-q", "-m", message], cwd=work)
    run(["git", "push", "-q", "origin", "main"], cwd=work)
    return run(["git", "rev-parse", "--short", "HEAD"], cwd=work).stdout.strip()


def sign(work: Path, keys: Sequence[Path], message: str) -> str:
    """Sign the work tree as a new release with every key; return fleetctl's summary line."""
    args: list[str | Path] = [BIN / "fleetctl", "release", "sign", work, "--message", message]
    for k in keys:
        args += ["--key", k]
    return run(args).stdout.strip()


def story(base: Path, n_devices: int, app_port: int) -> None:
    """Run the demo's story inside ``base``."""
    say("== edge-fleet demo ==")
    ops = base / "operator"
    ops.mkdir()
    keys = [ops / "alice.key", ops / "bob.key"]
    trust = [run([BIN / "fleetctl", "keys", "generate", "--out", k]).stdout.strip() for k in keys]
    say(f"1. operator keys generated (2 of 2 must sign): {trust[0][:20]}…, {trust[1][:20]}…")

    mirrors = base / "mirror"
    mirrors.mkdir()
    run(["git", "init", "-q", "--bare", "-b", "main", mirrors / "fleet.git"])
    work = ops / "config-repo"
    shutil.copytree(REPO / "examples" / "config-repo", work)
    # The example's gateway listens on 8443; here a stand-in listener on a free port plays it.
    app = work / "bundles/gateway-app/bundle.yaml"
    app.write_text(app.read_text().replace("8443", str(app_port)))
    run(["git", "init", "-q", "-b", "main"], cwd=work)
    run(["git", "remote", "add", "origin", mirrors / "fleet.git"], cwd=work)
    lint = run([BIN / "fleetctl", "lint", work])
    say(f"2. fleetctl lint: {lint.stdout.strip().splitlines()[-1]}")
    say(f"3. {sign(work, keys, 'first release')}".replace(", signed by", "\n   signed by"))
    commit = commit_and_push(work, "Release 1")

    with git_daemon(mirrors) as port:
        url = f"git://127.0.0.1:{port}/fleet.git"
        say(f"4. pushed {commit}; mirror: git daemon on {url}")
        sites = ["berlin", "paris", "oslo"]
        devices = []
        for i in range(n_devices):
            labels = {"role": "gateway", "site": sites[i % 3]}
            if i == 0:
                labels["canary"] = "true"
            dev = Device(base / "devices", f"dev-{i:02d}", labels, "gateway")
            dev.write_config(url, trust)
            dev.agent("init", check=True)
            devices.append(dev)
        say(f"5. {n_devices} devices enrolled (edge-agent init: identity + encryption keys)")

        results = sync_all(devices)
        say(f"6. first sync: {tally(results)}")
        for dev_id, res in results.items():
            if res.get("outcome") not in ("applied", "noop"):
                say(f"   {dev_id}: {res.get('outcome')} {res.get('step') or ''} {res.get('reason') or ''}")
        motd = (devices[0].root / "etc/motd").read_text().strip()
        say(f"   dev-00:/etc/motd says {motd!r}")
        say(f"   second sync: {tally(sync_all(devices))}")

        # A push that was never signed: the device refuses it and stays exactly as it was.
        (work / "bundles/motd/files/chrony.conf").write_text("server evil.example.invalid iburst\n")
        bad = commit_and_push(work, "tampered, not re-signed")
        before = tree_digest(devices[1].root)
        r = devices[1].sync()
        same = "unchanged" if tree_digest(devices[1].root) == before else "CHANGED"
        say(f"7. unsigned change {bad} pushed: dev-01 {r.get('outcome')} ({r.get('reason')}); "
            f"its files {same}")
        run(["git", "checkout", "-q", "HEAD~1", "--", "bundles/motd/files/chrony.conf"], cwd=work)

        # A signed release whose health check fails on the device: rolled back on its own.
        bundle = work / "bundles/motd/bundle.yaml"
        good_bundle = bundle.read_text()
        bundle.write_text(good_bundle.replace('content: "managed by edge-fleet\\n"',
                                              'content: "release 2 (broken)\\n"')
                          + "health:\n  - kind: tcp\n    name: app-port\n    port: 1\n    timeout: 1\n")
        sign(work, keys, "release with a failing health check")
        bad = commit_and_push(work, "Release 2: app listens on a port that is closed")
        r = devices[0].sync()
        motd = (devices[0].root / "etc/motd").read_text().strip()
        say(f"8. signed release 2 ({bad}) with a failing health check on canary dev-00: "
            f"{r.get('outcome')} at {r.get('step')!s}; /etc/motd back to {motd!r}")
        bundle.write_text(good_bundle)
        sign(work, keys, "release 3: release 2 reverted")
        fixed = commit_and_push(work, "Release 3: revert release 2")
        say(f"   release 3 ({fixed}, the revert) everywhere: {tally(sync_all(devices))}")

        # Drift: somebody edits a managed file by hand; the next reconcile puts it back.
        victim = devices[2].root / "etc/motd"
        victim.write_text("hand edit\n")
        r = devices[2].sync()
        say(f"9. drift on dev-02 (/etc/motd edited by hand): sync {r.get('outcome')}, "
            f"/etc/motd is {victim.read_text().strip()!r} again")
        status = json.loads(devices[2].agent("status", "--json", check=True).stdout)
        say(f"10. dev-02 status: release {status.get('installed', {}).get('version')}, "
            f"{status.get('managed')} managed resources, {status.get('outbox')} reports queued in its outbox")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit code."""
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="how many simulated devices (default 8)")
    parser.add_argument("--exit-when-done", action="store_true", help="do not wait for Ctrl-C at the end")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="edge-fleet-demo-"))
    try:
        with gateway_app() as app_port:
            story(base, max(4, args.devices), app_port)
        if not args.exit_when_done and sys.stdin.isatty():
            say("done. Ctrl-C to clean up and exit.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        say("done.")
        return 0
    finally:
        if args.keep:
            say(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
