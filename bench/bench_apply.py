"""Agent reconcile benchmark: a signed release of N file resources applied into an empty root.

Measures, on the same machine in the same run:
- first apply and no-op re-run of ``edge-agent sync --once`` (a fresh process each time: the
  figure an operator sees from the command line, interpreter start-up included);
- the same two figures in-process (``edge_agent.agent.sync_once`` in a warm interpreter: what the
  daemon pays per sync);
- the daemon's RSS and CPU while idle (``edge-agent run`` after it applied the release); the peak
  RSS of an apply is measured by ``bench.bench_footprint`` (each process reports its own VmHWM);
- a minimal Python baseline: SHA-256 compare, temp + fsync + rename, one directory fsync per
  directory — the floor the agent cannot beat by much.

Usage: ``python -m bench.bench_apply [--files 500] [--runs 5]``. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import psutil

from tests.support.package_spec import agent_dropped_extensions, agent_package

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1"}


def sh(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a command, fail loudly, return stdout."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=GIT_ENV, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def agent_optimize() -> int:
    """The optimisation level (``-O`` count) the agent package's commands run with."""
    return int(agent_package().optimize)


def agent_python_flags() -> list[str]:
    """The interpreter flags of the packaged ``edge-agent`` command (its ``#!`` line), e.g. ``-OO``."""
    level = agent_optimize()
    return ["-" + "O" * level] if level else []


def agent_prelude() -> str:
    """Python statements that leave out of a process what the agent package leaves out of its venv:
    the compiled modules it drops cannot be imported, so their libraries run their pure-Python code
    as they do on a device (empty when the package drops none)."""
    dropped = list(agent_dropped_extensions())
    return f"import sys as _ps\n_ps.modules.update(dict.fromkeys({dropped!r}))\n" if dropped else ""


def compile_like_the_package() -> None:
    """Byte-compile as the .deb ships (``compileall``, checked-hash pycs), so a measured
    ``edge-agent`` process loads bytecode as a device does instead of compiling its sources on
    every start (which it would when the environment sets PYTHONDONTWRITEBYTECODE).

    The project's modules get plain and optimised byte code (the tests and other benchmarks run them
    unoptimised). When the package runs its commands optimised, the virtualenv's third-party
    packages (pip compiled them unoptimised) get optimised byte code too, and the standard library
    gets what the package's postinst writes on a device (``python -OO -m edge_agent.bytecode``)."""
    project = Path(__file__).resolve().parents[1]
    level = agent_optimize()
    sh(sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash", "-o", "0",
       "-o", str(level), project / "edge_core", project / "edge_agent", project / "fleet_server")
    if level:
        site = Path(sysconfig.get_path("purelib"))
        sh(sys.executable, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "checked-hash",
           "-o", str(level), site)
        sh(sys.executable, *agent_python_flags(), "-m", "edge_agent.bytecode")


def contents(n: int) -> dict[str, bytes]:
    """N files of about 1 KB each, as device path -> content."""
    return {f"/opt/bench/d{i % 20:02d}/f{i:04d}.conf": (f"# file {i}\n" + "x" * 1000 + "\n").encode()
            for i in range(n)}


def make_release(base: Path, n: int) -> tuple[str, list[str]]:
    """Create a signed config repo with one bundle of N file resources; return (url, trust keys)."""
    key = base / "op.key"
    pub = sh(BIN / "fleetctl", "keys", "generate", "--out", key).strip()
    work = base / "repo"
    bundle = work / "bundles" / "bench"
    (bundle / "files").mkdir(parents=True)
    lines = ["targets:", "  - devices: [bench-1]", "resources:"]
    for i, (path, data) in enumerate(contents(n).items()):
        (bundle / "files" / f"f{i:04d}.conf").write_bytes(data)
        lines += [f"  - kind: file\n    path: {path}\n    source: files/f{i:04d}.conf\n    mode: \"0644\""]
    (bundle / "bundle.yaml").write_text("\n".join(lines) + "\n")
    (work / "fleet.yaml").write_text("description: bench\n")
    sh("git", "init", "-q", "-b", "main", cwd=work)
    sh(BIN / "fleetctl", "release", "sign", work, "--key", key)
    sh("git", "add", "-A", cwd=work)
    sh("git", "commit", "-q", "-m", "bench release", cwd=work)
    mirror = base / "mirror.git"
    sh("git", "clone", "-q", "--bare", work, mirror)
    return f"file://{mirror}", [pub]


def device_config(base: Path, name: str, url: str, trust: list[str]) -> Path:
    """Write an agent.yaml for a fresh device under base/name; return its path."""
    d = base / name
    (d / "root").mkdir(parents=True)
    cfg = {"device_id": "bench-1", "profile": "generic-linux", "profile_dirs": [str(REPO / "device_profiles")],
           "repo": {"url": url}, "trust": {"keys": trust}, "root": str(d / "root"),
           "state_dir": str(d / "state"), "log_level": "warning", "intervals": {"poll": "1h", "drift": "1h"}}
    path = d / "agent.yaml"
    path.write_text(json.dumps(cfg))
    return path


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cli_sync(config: Path) -> None:
    """One `edge-agent sync --once` process."""
    proc = subprocess.run([BIN / "edge-agent", "sync", "--once", "--json", "--config", config],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"sync failed: {proc.stderr.strip()[-300:]}")


def baseline_apply(root: Path, files: dict[str, bytes]) -> None:
    """The minimal atomic writer: compare digests, write only what differs."""
    dirs: set[Path] = set()
    for path, data in files.items():
        target = root / path.lstrip("/")
        try:
            if hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest():
                continue
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dirs.add(target.parent)
    for d in dirs:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def idle_daemon_rss(config: Path, seconds: float) -> tuple[float, float]:
    """Start `edge-agent run`, let it settle, return (RSS MiB, CPU % over the idle window)."""
    proc = subprocess.Popen([BIN / "edge-agent", "run", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(3.0)  # start-up sync of an already applied release
        cpu0 = sum(p.cpu_times()[:2])
        t0 = time.monotonic()
        time.sleep(seconds)
        cpu = (sum(p.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0) * 100
        return p.memory_info().rss / 2**20, cpu
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    args = ap.parse_args()
    from edge_agent.agent import SyncCache, sync_once
    from edge_agent.config import load_config

    compile_like_the_package()
    base = Path(tempfile.mkdtemp(prefix="bench-apply-"))
    try:
        url, trust = make_release(base, args.files)
        rows: dict[str, list[float]] = {k: [] for k in ("cli_first", "cli_noop", "inproc_first", "inproc_noop",
                                                          "base_first", "base_noop", "py_start")}
        for run in range(args.runs):
            cfg = device_config(base, f"cli{run}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg)
            rows["cli_first"].append(timed(partial(cli_sync, cfg)))
            rows["cli_noop"].append(timed(partial(cli_sync, cfg)))
            rows["py_start"].append(timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)))

            cfg2 = device_config(base, f"inproc{run}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg2)
            config = load_config(cfg2)
            cache = SyncCache()  # what the daemon keeps between syncs
            rows["inproc_first"].append(timed(partial(sync_once, config, now=datetime.now(UTC), cache=cache)))
            rows["inproc_noop"].append(timed(partial(sync_once, config, now=datetime.now(UTC), cache=cache)))

            broot = base / f"base{run}"
            broot.mkdir()
            files = contents(args.files)
            rows["base_first"].append(timed(partial(baseline_apply, broot, files)))
            rows["base_noop"].append(timed(partial(baseline_apply, broot, files)))
        med = {k: statistics.median(v) for k, v in rows.items()}
        idle_rss, idle_cpu = idle_daemon_rss(base / "cli0" / "agent.yaml", args.idle_seconds)

        print(f"# agent reconcile, {args.files} file resources, median of {args.runs} runs")
        print("| measurement | edge-agent | baseline (in-process) | ratio |")
        print("|---|---|---|---|")
        print(f"| first apply, in-process | {med['inproc_first']*1000:.0f} ms | {med['base_first']*1000:.0f} ms "
              f"| {med['inproc_first']/med['base_first']:.1f}x |")
        print(f"| no-op, in-process (daemon) | {med['inproc_noop']*1000:.0f} ms | {med['base_noop']*1000:.1f} ms "
              f"| {med['inproc_noop']/med['base_noop']:.1f}x |")
        print(f"| first apply, `edge-agent sync --once` | {med['cli_first']*1000:.0f} ms | | |")
        print(f"| no-op, `edge-agent sync --once` | {med['cli_noop']*1000:.0f} ms | | |")
        print(f"| interpreter start-up (`python -c pass`) | {med['py_start']*1000:.0f} ms | | |")
        print(f"| RSS of `edge-agent run`, idle | {idle_rss:.1f} MiB | | |")
        print(f"| CPU of `edge-agent run`, idle {args.idle_seconds:.0f} s | {idle_cpu:.2f} % | | |")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
