"""Agent footprint: peak RSS during a 500-file apply and idle, CPU while idle for a minute, and what
the resident memory is made of.

Measures, against a signed release of N file resources (the one :mod:`bench.bench_apply` builds):

- ``edge-agent sync --once`` applying the release into an empty root: the child's peak RSS
  (its ``VmHWM`` as it exits) and wall time, median of several runs (the packaged variant of the
  settings below);
- ``edge-agent run`` (the daemon, connected to a real Mosquitto on loopback, the shipped default
  intervals: drift check and health report every 60 s, poll every 300 s) applying the same release at
  start-up: its peak RSS (``VmHWM``), then, once the first sync is done, its RSS and CPU share over an
  idle window (default 60 s, so one drift check of every file and one health report fall inside it).
  The daemon runs with the ``Environment=`` settings of the shipped systemd unit
  (``packaging/edge-agent.service``: ``MALLOC_ARENA_MAX=1`` among them) and, like ``sync --once``,
  with the interpreter flags of the packaged command (``-OO``, its ``#!`` line), optimised
  byte code for every module it loads and without the compiled modules the package leaves out of
  its venv (dulwich's accelerators, :func:`bench.bench_apply.agent_prelude`), as it does on a device.
  It is measured four times: with the mirror as a local ``file://`` repository, and served over
  the network on loopback by ``git daemon`` (``git://``) and by ``git http-backend`` (smart HTTP,
  ``http://``, and ``https://`` with a certificate from a test CA that a trust store holds beside
  the system's CAs), which load the network clients on the first fetch as a device's mirror does;
- what each footprint setting saves, on ``sync --once`` (median peak RSS and wall time of the same
  number of runs, each setting undone alone, the runs of every variant and of the packaged
  reference taking turns): ``-OO``, optimised byte code on the machine
  (``PYTHONPYCACHEPREFIX`` at an empty directory makes every module compile from source, as a device
  without it would), leaving dulwich's compiled accelerators out, and the state database's page
  cache (SQLite's own 2 MiB instead of ``PAGE_CACHE_KIB``);
- what a few alternatives would add to a process that has the daemon's imports (``VmHWM`` after
  minus before, median of 3): dulwich's urllib3 HTTP client, and a TLS context from
  :func:`ssl.create_default_context` (the whole CA bundle) beside :func:`edge_core.tls.client_context`;
- for comparison, the RSS of a bare interpreter, and what each import adds to it (each module
  imported alone in a fresh interpreter, ``VmHWM`` after minus a bare interpreter's), and the
  slowest imports of the daemon's start-up by ``python -X importtime``.

    python -m bench.bench_footprint [--files 500] [--runs 3] [--idle-seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.bench_apply import (
    BIN,
    agent_prelude,
    agent_python_flags,
    compile_like_the_package,
    device_config,
    make_release,
    sh,
)

__all__ = ["IMPORTS", "UNIT", "daemon_footprint", "import_costs", "importtime_top", "main", "oneshot_peak_rss",
           "unit_environment"]

# Modules the daemon loads, in the order of the layers they belong to (each measured alone).
IMPORTS = ("json", "logging", "ssl", "sqlite3", "yaml", "nacl.signing", "psutil", "paho.mqtt.client",
           "dulwich.client", "edge_agent.config", "edge_core.trust.verify", "edge_core.source",
           "edge_agent.agent", "edge_agent.daemon")
MIB = 2**20
MIRRORS = (("daemon_git", "git://"), ("daemon_http", "http://"), ("daemon_https", "https://"))
"""The daemon's runs with a mirror over the network: result key -> transport."""
DAEMON_IMPORTS = "import edge_agent.cli, edge_agent.daemon, edge_core.gitclients"
"""What a daemon that fetched over the network has imported: the base of :func:`marginal_costs`."""
MARGINAL = {
    "urllib3": "import urllib3",
    "ssl.create_default_context()": "import ssl; ssl.create_default_context()",
    "edge_core.tls.client_context()": "from edge_core.tls import client_context; client_context()",
}
"""What :func:`marginal_costs` adds to the daemon's imports, by name."""
PACKAGED = "as packaged"
"""The reference variant of :func:`setting_costs`: nothing undone."""
DEVICE_TLS_ENV: dict[str, str | None] = {"SSL_CERT_FILE": None, "SSL_CERT_DIR": None}
"""A device names no other trust store: TLS measurements run without these (a development machine
may set them)."""
UNIT = Path(__file__).resolve().parents[1] / "packaging" / "edge-agent.service"
"""The shipped systemd unit of the agent: the daemon is measured with its environment."""


def _environ(extra: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with ``extra`` applied (a None value removes the variable)."""
    env = dict(os.environ)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The variables the ``Environment=`` lines of ``unit`` set (systemd quoting, one or more a line)."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.removeprefix("Environment=")):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


# ``ru_maxrss`` of a child started with fork/vfork + exec keeps the parent's high-water mark from
# before the exec, so a child reports its own ``VmHWM`` (reset by exec) on the way out instead.
_HWM_SUFFIX = ("\nimport pathlib as _p\n"
               "print([l for l in _p.Path('/proc/self/status').read_text().splitlines()"
               " if l.startswith('VmHWM:')][0].split()[1], file=_sys.stderr)\n")
_AGENT = "import sys as _sys\nfrom edge_agent.cli import main\n"
"""The console script's code, less its ``sys.exit``: what ``edge-agent`` runs."""
_DAEMON = _AGENT + "_sys.exit(main(_sys.argv[1:]))\n"
_ONESHOT = (_AGENT +
            "try:\n    rc = main(_sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n" + _HWM_SUFFIX +
            "_sys.exit(rc)\n")


def _hwm_from_stderr(stderr: str) -> float:
    """The VmHWM (KiB) a child printed as the last line of its stderr, in MiB."""
    return int(stderr.strip().splitlines()[-1]) / 1024


def oneshot_peak_rss(config: Path, *, flags: list[str] | None = None, before: str | None = None,
                     env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``edge-agent sync --once`` (the console script's code, which then prints its ``VmHWM``)
    with the packaged command's interpreter flags (or ``flags``), after the Python statements
    ``before`` (default: :func:`agent_prelude`, the package's module set) and with ``env`` added to
    the environment; return (its peak RSS in MiB, wall seconds)."""
    t0 = time.perf_counter()
    prelude = agent_prelude() if before is None else before
    argv = [sys.executable, *(agent_python_flags() if flags is None else flags), "-c", prelude + "\n" + _ONESHOT,
            "sync", "--once", "--config", str(config)]
    proc = subprocess.run(argv, env=_environ(dict(env or {})), capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"edge-agent sync --once failed: {proc.stderr.strip()[-300:]}")
    return _hwm_from_stderr(proc.stderr), elapsed


def daemon_footprint(config: Path, root: Path, n_files: int, idle_seconds: float,
                     env: dict[str, str | None] | None = None) -> dict[str, float]:
    """Start ``edge-agent run`` on a fresh device (with the shipped unit's environment, and ``env``),
    wait for its first apply, then watch it idle.

    Returns its peak RSS over the apply, its RSS after it, and its RSS (max) and CPU share while idle.

    Raises:
        SystemExit: the daemon exited, or did not apply the release within two minutes.
    """
    proc = subprocess.Popen([sys.executable, *agent_python_flags(), "-c", agent_prelude() + _DAEMON, "run",
                             "--config", str(config)],
                            env=_environ({**unit_environment(), **(env or {})}),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        p = psutil.Process(proc.pid)
        t0 = time.monotonic()
        last = root / "opt" / "bench" / f"d{(n_files - 1) % 20:02d}" / f"f{n_files - 1:04d}.conf"
        while not last.exists():
            if proc.poll() is not None:
                raise SystemExit(f"edge-agent run exited with {proc.returncode} before applying")
            if time.monotonic() - t0 > 120:
                raise SystemExit("edge-agent run did not apply the release within 120 s")
            time.sleep(0.05)
        apply_seconds = time.monotonic() - t0
        time.sleep(3.0)  # the end of the first sync: its report and state record
        peak_apply = _status_kib(proc.pid, "VmHWM") / 1024
        rss_after = _status_kib(proc.pid, "VmRSS") / 1024
        cpu0 = sum(p.cpu_times()[:2])
        w0 = time.monotonic()
        rss_max = rss_after
        while time.monotonic() - w0 < idle_seconds:
            time.sleep(min(1.0, max(0.0, idle_seconds - (time.monotonic() - w0))))
            rss_max = max(rss_max, _status_kib(proc.pid, "VmRSS") / 1024)
        cpu = (sum(p.cpu_times()[:2]) - cpu0) / (time.monotonic() - w0) * 100
        return {"start_to_applied_seconds": apply_seconds, "peak_rss_apply_mib": peak_apply,
                "rss_after_apply_mib": rss_after, "idle_rss_max_mib": rss_max,
                "idle_peak_hwm_mib": _status_kib(proc.pid, "VmHWM") / 1024, "idle_cpu_percent": cpu,
                "idle_seconds": idle_seconds}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)


def _hwm_after(module: str | None) -> float:
    return _hwm_of(f"import {module}" if module else "")


def _hwm_of(statements: str, env: dict[str, str | None] | None = None) -> float:
    """The peak RSS (MiB) of a fresh interpreter, with the agent's flags and ``env``, that ran
    ``statements``."""
    code = agent_prelude() + "import sys as _sys\n" + statements + "\n" + _HWM_SUFFIX
    return _hwm_from_stderr(subprocess.run([sys.executable, *agent_python_flags(), "-c", code], env=_environ(env),
                                           capture_output=True, text=True, check=True).stderr)


def marginal_costs() -> dict[str, float]:
    """What each statement of :data:`MARGINAL` adds to the peak RSS of a process that has the
    daemon's imports (MiB, median of 3), with the system's own trust store as on a device."""
    base = statistics.median(_hwm_of(DAEMON_IMPORTS, DEVICE_TLS_ENV) for _ in range(3))
    return {name: statistics.median(_hwm_of(f"{DAEMON_IMPORTS}\n{stmt}", DEVICE_TLS_ENV) for _ in range(3))
            - base for name, stmt in MARGINAL.items()}


def setting_costs(base: Path, url: str, trust: list[str], runs: int) -> dict[str, dict[str, Any]]:
    """The median peak RSS (``mib``, each run's in ``samples``) and wall time (``seconds``) of
    ``sync --once`` applying the release to a fresh device as packaged (``PACKAGED``) and with one
    footprint setting undone at a time, by setting; the variants take turns, run by run, so that
    they share the machine's conditions."""
    empty = base / "no-bytecode"
    empty.mkdir()
    variants: dict[str, dict[str, Any]] = {
        PACKAGED: {},
        "without -OO": {"flags": []},
        "no optimised byte code (compiled from source)": {"env": {"PYTHONPYCACHEPREFIX": str(empty)}},
        "with dulwich's compiled accelerators": {"before": ""},
        "SQLite's default page cache (2 MiB)": {"before": agent_prelude() + "import edge_agent.state_db as _s\n"
                                                          "_s.PAGE_CACHE_KIB = 2000"},
    }
    peaks: dict[str, list[float]] = {name: [] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run_no in range(runs):
        for number, (name, how) in enumerate(variants.items()):
            cfg = device_config(base, f"setting-{number}-{run_no}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg)
            peak, seconds = oneshot_peak_rss(cfg, **how)
            peaks[name].append(peak)
            times[name].append(seconds)
    return {name: {"mib": statistics.median(peaks[name]), "samples": peaks[name],
                   "seconds": statistics.median(times[name])} for name in variants}


def import_costs(modules: tuple[str, ...] = IMPORTS) -> dict[str, Any]:
    """Peak RSS of a bare interpreter and how much each module adds when imported alone (MiB, median
    of 3), with the agent's interpreter flags."""
    bare = statistics.median(_hwm_after(None) for _ in range(3))
    added = {m: statistics.median(_hwm_after(m) for _ in range(3)) - bare for m in modules}
    return {"bare_interpreter_mib": bare, "added_mib": added}


def importtime_top(module: str = "edge_agent.daemon", top: int = 12) -> list[tuple[str, float]]:
    """The ``top`` packages taking longest to import (cumulative ms, ``-X importtime``) under ``module``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"{agent_prelude()}import {module}"],
                          capture_output=True, text=True, check=True)
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        package = parts[2].strip().split(".")[0]
        if package != module.split(".", maxsplit=1)[0]:
            by_package[package] = max(by_package.get(package, 0.0), int(parts[1]) / 1000)
    return sorted(by_package.items(), key=lambda r: r[1], reverse=True)[:top]


def run(n_files: int, runs: int, idle_seconds: float) -> dict[str, Any]:
    """Measure everything; return the figures."""
    from tests.support.broker import Mosquitto
    from tests.support.mirror import GitDaemon, SmartHttpMirror
    from tests.support.tls import hashed_store, make_ca

    compile_like_the_package()
    base = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    try:
        url, trust = make_release(base, n_files)
        settings = setting_costs(base, url, trust, runs)  # its packaged variant is the sync --once row
        packaged = settings[PACKAGED]
        # https: the mirror's certificate comes from a test CA, trusted in a store that holds the
        # system's CAs too, read as the agent reads the system's (SSL_CERT_DIR names it)
        certs = make_ca(base / "ca")
        store: dict[str, str | None] = {**DEVICE_TLS_ENV,
                                        "SSL_CERT_DIR": str(hashed_store(base / "trust", certs.ca, system=True))}
        with Mosquitto(base / "broker") as broker, GitDaemon(base) as mirror, SmartHttpMirror(base) as web, \
                SmartHttpMirror(base, tls=certs.server_context()) as secure:
            daemons = {}
            urls = {"daemon": url, "daemon_git": mirror.url("mirror.git"), "daemon_http": web.url("mirror.git"),
                    "daemon_https": secure.url("mirror.git")}
            for name, mirror_url in urls.items():
                env: dict[str, str | None] = store if name == "daemon_https" else {}
                cfg = device_config(base, name, mirror_url, trust)
                raw = json.loads(cfg.read_text())
                raw["mqtt"] = {"host": "127.0.0.1", "port": broker.port}
                del raw["intervals"]  # the shipped defaults
                cfg.write_text(yaml.safe_dump(raw))
                sh(BIN / "edge-agent", "init", "--config", cfg)
                daemons[name] = daemon_footprint(cfg, cfg.parent / "root", n_files, idle_seconds, env)
        return {"files": n_files, "runs": runs, "oneshot_peak_rss_mib": packaged["mib"],
                "oneshot_peak_rss_samples": packaged["samples"], "oneshot_seconds": packaged["seconds"],
                **daemons, "settings": settings, "marginal": marginal_costs(),
                "imports": import_costs(), "importtime_ms": importtime_top()}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the figures (JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.files, args.runs, args.idle_seconds)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    d = r["daemon"]
    print(f"# footprint, {r['files']} file resources")
    print(f"edge-agent sync --once, peak RSS during the apply: {r['oneshot_peak_rss_mib']:.1f} MiB "
          f"(median of {r['runs']}, {r['oneshot_seconds']:.2f} s)")
    print(f"edge-agent run: peak RSS over start-up + first apply {d['peak_rss_apply_mib']:.1f} MiB, "
          f"RSS after {d['rss_after_apply_mib']:.1f} MiB")
    print(f"edge-agent run idle {d['idle_seconds']:.0f} s: RSS max {d['idle_rss_max_mib']:.1f} MiB, "
          f"CPU {d['idle_cpu_percent']:.2f} %")
    for key, transport in MIRRORS:
        g = r[key]
        print(f"edge-agent run, mirror over {transport}: peak RSS over start-up + first apply "
              f"{g['peak_rss_apply_mib']:.1f} MiB, idle RSS max {g['idle_rss_max_mib']:.1f} MiB")
    for name, cost in r["settings"].items():
        print(f"edge-agent sync --once {name}: peak RSS {cost['mib']:.1f} MiB, {cost['seconds']:.2f} s")
    for name, mib in r["marginal"].items():
        print(f"after the daemon's imports, {name} adds {mib:.1f} MiB")
    print(f"bare interpreter peak RSS: {r['imports']['bare_interpreter_mib']:.1f} MiB; each import adds:")
    for mod, mib in r["imports"]["added_mib"].items():
        print(f"  {mod:28s} +{mib:.1f} MiB")
    print("slowest imports of edge_agent.daemon (cumulative ms):",
          ", ".join(f"{n} {ms:.0f}" for n, ms in r["importtime_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
