"""Run every benchmark and write ``docs/benchmarks.md``: each figure beside the reference measured in
the same run, the ratio, the goal, whether it is met, and the exact command that produced it.

    python -m bench.run_all [--only peers,ingest,...] [--out docs/benchmarks.md]

Each benchmark runs as its own process (the command shown in the table, from the repository root);
its raw output is kept in ``bench/out/<name>.txt``. A benchmark that fails or is missing leaves a
named gap in the table instead of a figure. Benchmarks never become timed assertions in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.bench_footprint import MIRRORS, PACKAGED

__all__ = ["BENCHES", "Row", "main"]

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    figure: str
    value: str
    reference: str
    ratio: str
    goal: str
    met: str
    command: str


@dataclass(frozen=True)
class Bench:
    """A benchmark: its name, its command line (after ``python``), a time limit and how to read it."""

    name: str
    args: tuple[str, ...]
    timeout: float
    rows: Callable[[str, str], list[Row]]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def _x(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.1f}×" if value >= 1 else f"{value:.2f}×"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _json_tail(stdout: str) -> dict[str, Any]:
    """The JSON object a benchmark printed (from its first ``{`` line to the end)."""
    start = stdout.find("\n{")
    result: dict[str, Any] = json.loads(stdout if stdout.startswith("{") else stdout[start + 1:])
    return result


# --- readers: raw stdout -> rows -------------------------------------------------------------------

def _run_ms(seconds: float, files: int) -> str:
    """A whole run's time with its per-file share."""
    return f"{_ms(seconds)} ({_ms(seconds / files)}/file)"


def peers_rows(stdout: str, cmd: str) -> list[Row]:
    """Rows of :mod:`bench.bench_peers`: each row compares one of its groups, the same files on both sides."""
    r = _json_tail(stdout)
    groups = r["groups"]
    warm, trio, pair = groups["in_process"], groups["all_peers"], groups["agent_pyinfra"]
    rows = []
    for phase, label in (("noop", "no-op re-run"), ("first", "first apply")):
        n, med = warm["files"], warm["median_seconds"]
        agent, base = med[f"agent_warm_{phase}"], med[f"baseline_{phase}"]
        limit = 0.1 if phase == "noop" else 1.0
        rows.append(Row(f"{label}, {n} files, in-process: agent sync in a warm process (what the daemon pays)",
                        _ms(agent), f"baseline writer in-process, {n} files: {_ms(base)}", _x(agent / base),
                        f"≤ {_ms(limit)}; ≤ 3× baseline", _met(agent <= limit and agent / base <= 3), cmd))
        n, med = pair["files"], pair["median_seconds"]
        rows.append(Row(f"{label}, {n} files, whole process: `edge-agent sync --once`",
                        _ms(med[f"agent_cli_{phase}"]), f"`python -c pass` {_ms(r['python_start_seconds'])}", "",
                        "in-process figure + interpreter start-up", "see note", cmd))
        want_a = 500 if phase == "noop" else 100
        n, med = trio["files"], trio["median_seconds"]
        agent = med[f"agent_cli_{phase}"]
        for peer, name, goal in (("ansible", "`ansible-playbook -c local` copy", f"≥ {want_a}× faster"),
                                 ("pyinfra", "pyinfra `@local` files.put", "(no goal at this count)")):
            ratio = med[f"{peer}_{phase}"] / agent
            rows.append(Row(f"{label}, {n} files each, whole processes: `edge-agent sync --once`",
                            _run_ms(agent, n), f"{name}, {n} files: {_run_ms(med[f'{peer}_{phase}'], n)}",
                            _x(ratio) + " faster", goal,
                            _met(ratio >= want_a) if peer == "ansible" else "—", cmd))
        n, med = pair["files"], pair["median_seconds"]
        agent = med[f"agent_cli_{phase}"]
        ratio = med[f"pyinfra_{phase}"] / agent
        rows.append(Row(f"{label}, {n} files each, whole processes: `edge-agent sync --once`", _run_ms(agent, n),
                        f"pyinfra `@local` files.put, {n} files: {_run_ms(med[f'pyinfra_{phase}'], n)}",
                        _x(ratio) + " faster", "≥ 50× faster" if phase == "noop" else "(no goal)",
                        _met(ratio >= 50) if phase == "noop" else "—", cmd))
    return rows


def ingest_rows(stdout: str, cmd: str) -> list[Row]:
    """Rows of :mod:`bench.bench_broker_ingest`: N ingest processes against N bare subscribers (same work)."""
    r = _json_tail(stdout)
    rows = []
    for ph in r["phases"]:
        ing, bare, msub = ph["ingest"], ph["bare_paho"], ph["mosquitto_sub"]
        n = ph["workers"]
        nbare = bare.get("processes", 1)
        if ph["shared"]:
            what = f"{n} processes sharing `$share/fleet/...`"
            ref = f"{nbare} bare paho processes sharing `$share/bench-bare/...`"
        else:
            what, ref = "1 process, plain subscription", "1 bare paho process, plain subscription"
        lossless = ing["loss"] == 0 and ing["dropped"] == 0 and bare["loss"] == 0 and msub["loss"] == 0
        pub = ph.get("publishers")
        offered = f"; publishers offered {pub['rate']:,.0f} msg/s" if pub else ""
        ratio_b = ing["rate"] / bare["rate"] if bare["rate"] and nbare == n else float("nan")
        rows.append(Row(f"ingest, {r['messages']} msgs QoS 1, {what} (absolute msg/s on this machine)",
                        f"{ing['rate']:,.0f} msg/s, loss {ing['loss']}",
                        f"{ref}: {bare['rate']:,.0f} msg/s, loss {bare['loss']}{offered}", _x(ratio_b),
                        "≥ 0.8× bare paho at the same process count, zero loss",
                        _met(ratio_b >= 0.8 and lossless), cmd))
        if not ph["shared"]:
            ratio_m = ing["rate"] / msub["rate"] if msub["rate"] else float("nan")
            rows.append(Row(f"ingest, {what}", f"{ing['rate']:,.0f} msg/s",
                            f"1 `mosquitto_sub` process: {msub['rate']:,.0f} msg/s, loss {msub['loss']}",
                            _x(ratio_m), "how close to mosquitto_sub (no goal)", "—", cmd))
        else:
            rows.append(Row(f"ingest, {what}: absolute capacity only", f"{ing['rate']:,.0f} msg/s",
                            f"1 `mosquitto_sub` process in the same phase: {msub['rate']:,.0f} msg/s, "
                            f"loss {msub['loss']} (other work split: no ratio){offered}", "", "(no goal)", "—",
                            cmd))
    return rows


def c2a_rows(stdout: str, cmd: str) -> list[Row]:
    """Rows of :mod:`bench.bench_commit_to_applied`: the whole path, push to the device's report."""
    r = _json_tail(stdout)
    st = r["stats"]
    total = st["push_to_applied"]
    peers = "Argo CD 120 s + ≤ 60 s jitter; Rancher Fleet 15 s; Mender 1800 s (documented default polls)"
    what = (f"{r['files']} files in {r['bundles']} bundles, `fleetctl release sign`, {r['commits']} commits, "
            "one file changed per commit")
    rows = [Row(f"commit to applied, whole path: `git push` (git://) → fleet-server webhook → Git watcher "
                f"verifies + records → nudge → `edge-agent run` fetches + applies → `sync_succeeded` seen; {what}; "
                "p50", f"{total['p50']:.3f} s", peers, "", "≤ 1 s", _met(total["p50"] <= 1.0), cmd),
            Row("commit to applied, whole path, p95 (max)", f"{total['p95']:.3f} s ({total['max']:.3f} s)", "", "",
                "≤ 2 s", _met(total["p95"] <= 2.0), cmd)]
    if "webhook_to_nudge" in st:
        missing = f"; {r['missing_nudges']} commit(s) without a nudge seen left out" if r["missing_nudges"] else ""
        rows.append(Row("commit to applied, stages (p50)",
                        f"push {_ms(st['push']['p50'])}; webhook → nudge {_ms(st['webhook_to_nudge']['p50'])}; "
                        f"nudge → `sync_succeeded` {_ms(st['nudge_to_applied']['p50'])}{missing}", "", "",
                        "(no goal)", "—", cmd))
    return rows


_FETCH = re.compile(r"^(edge_core\.source \(dulwich\)|git fetch \(full clone\))\s+([\d.]+)\s+(\d+)", re.M)


def fetch_rows(stdout: str, cmd: str) -> list[Row]:
    """Rows of :mod:`bench.bench_fetch` (its text output)."""
    found = {m.group(1).split()[0]: (float(m.group(2)), int(m.group(3))) for m in _FETCH.finditer(stdout)}
    (dt, db), (gt, gb) = found["edge_core.source"], found["git"]
    return [Row("incremental fetch of a one-file commit, 5,000-commit mirror (shallow dulwich)",
                f"{_ms(dt)}, {db:,} bytes", f"`git fetch` {_ms(gt)}, {gb:,} bytes", _x(dt / gt),
                "≤ 1× git's time", _met(dt / gt <= 1.0), cmd)]


def footprint_rows(stdout: str, cmd: str) -> list[Row]:
    """Rows of :mod:`bench.bench_footprint`."""
    r = _json_tail(stdout)
    d, bare = r["daemon"], r["imports"]["bare_interpreter_mib"]
    limit = 40e6 / 2**20
    ref = f"bare interpreter {bare:.1f} MiB"
    return [
        Row(f"peak RSS, `edge-agent sync --once` applying {r['files']} files", f"{r['oneshot_peak_rss_mib']:.1f} MiB",
            ref, _x(r["oneshot_peak_rss_mib"] / bare), "≤ 40 MB (38.1 MiB)",
            _met(r["oneshot_peak_rss_mib"] <= limit), cmd),
        Row(f"peak RSS, `edge-agent run` over start-up + first apply of {r['files']} files",
            f"{d['peak_rss_apply_mib']:.1f} MiB", ref, _x(d["peak_rss_apply_mib"] / bare), "≤ 40 MB (38.1 MiB)",
            _met(d["peak_rss_apply_mib"] <= limit), cmd),
        Row(f"RSS, `edge-agent run` idle {d['idle_seconds']:.0f} s (max)", f"{d['idle_rss_max_mib']:.1f} MiB", ref,
            _x(d["idle_rss_max_mib"] / bare), "≤ 40 MB (38.1 MiB)", _met(d["idle_rss_max_mib"] <= limit), cmd),
        Row(f"CPU, `edge-agent run` idle {d['idle_seconds']:.0f} s (default intervals, MQTT connected)",
            f"{d['idle_cpu_percent']:.2f} %", "", "", "< 1 %", _met(d["idle_cpu_percent"] < 1.0), cmd),
        *_network_mirror_rows(r, ref, bare, limit, cmd),
    ]


def _network_mirror_rows(r: dict[str, Any], ref: str, bare: float, limit: float, cmd: str) -> list[Row]:
    """The daemon's rows with its mirror served over ``git://``, ``http://`` and ``https://`` (each
    absent from older outputs)."""
    rows: list[Row] = []
    for key, transport in MIRRORS:
        g = r.get(key)
        if g is None:
            continue
        rows += [
            Row(f"peak RSS, `edge-agent run` over start-up + first apply of {r['files']} files, "
                f"mirror over {transport}", f"{g['peak_rss_apply_mib']:.1f} MiB", ref,
                _x(g["peak_rss_apply_mib"] / bare), "≤ 40 MB (38.1 MiB)", _met(g["peak_rss_apply_mib"] <= limit),
                cmd),
            Row(f"RSS, `edge-agent run` idle {g['idle_seconds']:.0f} s (max), mirror over {transport}",
                f"{g['idle_rss_max_mib']:.1f} MiB", ref, _x(g["idle_rss_max_mib"] / bare), "≤ 40 MB (38.1 MiB)",
                _met(g["idle_rss_max_mib"] <= limit), cmd),
        ]
    return rows


def _rollout_size_rows(r: dict[str, Any], cmd: str) -> list[Row]:
    n = f"{r['devices']:,} devices"
    if r.get("store", "sqlite") != "sqlite":
        replicas = int(r.get("replicas", 1))
        n += f" on PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}"
    finished = bool(r.get("finished"))
    wall = f"{r['wall_seconds']:.1f} s" if finished else f"not finished in {r['timeout']:.0f} s"
    ref = f"registration {r.get('registration_seconds')} s"
    if "server_cpu_seconds" in r:
        ref += f"; server CPU {r['cpu_ms_per_device']:.2f} ms/device"
    rows = [Row(f"rollout, {n} heartbeating every {r.get('heartbeat', 60):.0f} s, {r['waves']} waves, zero soak "
                f"(phase: {r['phase']})", wall, ref, "", "≤ 5 min at 100,000 devices",
                _met(finished and r["wall_seconds"] <= 300), cmd)]
    if "lost" not in r:
        return rows
    p = r["p95_ms"]
    p95s = [v for v in (p["devices"], p["summary"], p["rollout"]) if v is not None]
    rows += [
        Row(f"rollout, {n}: reports lost (sent − stored)", str(r["lost"]),
            f"sent {sum(r['sent'].values()):,}, dropped {r['dropped']}", "", "0", _met(r["lost"] == 0), cmd),
        Row(f"rollout, {n}: ingest lag (backlog age, max)", f"{r['lag_max_seconds']} s",
            f"p95 {r['lag_p95_seconds']} s", "", "< 5 s",
            _met(r["lag_max_seconds"] is not None and r["lag_max_seconds"] < 5), cmd),
        *_delivery_rows(r, n, cmd),
        Row(f"rollout, {n}: p95 of GET /api/v1/devices (first page) / summary / rollout status, every 1 s",
            f"{p['devices']} / {p['summary']} / {p['rollout']} ms", f"{r['samples']} samples", "", "≤ 100 ms",
            _met(len(p95s) == 3 and max(p95s) <= 100), cmd),
        Row(f"rollout, {n}: server RSS (max{', the sum of the replicas’ peaks' if r.get('replicas', 1) > 1 else ''})",
            f"{r['rss_max_mib']:.0f} MiB", "", "", "≤ 500 MB", _met(r["rss_max_mib"] <= 500 / 1.048576), cmd),
    ]
    return rows


def _delivery_rows(r: dict[str, Any], n: str, cmd: str) -> list[Row]:
    receipt, probe = r.get("receive_lag"), r.get("probe_delivery")
    if not receipt or not probe or receipt.get("over_5s_share") is None or probe.get("over_5s_share") is None:
        return []
    return [Row(f"rollout, {n}: reports received more than 5 s after the device sent them (device `ts` → "
                "receipt; the simulated devices share this machine's 2 cores)",
                f"{100 * receipt['over_5s_share']:.1f} % at the fleet server (p95 ≤ {receipt['p95_le_seconds']} s)",
                f"an idle MQTT subscriber to {probe['devices']} of the devices: {100 * probe['over_5s_share']:.1f} % "
                f"(p95 {probe['p95_seconds']} s, {probe['reports']} reports)", "", "(no goal)", "—", cmd)]


def rollout_rows(stdout: str, cmd: str) -> list[Row]:
    """Rows of :mod:`bench.bench_rollout`: per fleet size, then how the wall time grows with it."""
    data = _json_tail(stdout)
    runs = data.get("runs", [data])
    rows = [row for r in runs for row in _rollout_size_rows(r, cmd)]
    if len(runs) > 1:
        growth = " → ".join(f"{r['wall_seconds']:.0f} s" if r.get("finished") else f"> {r['timeout']:.0f} s"
                            for r in runs)
        sizes = " / ".join(f"{r['devices'] // 1000}k" for r in runs)
        rows.append(Row(f"rollout wall time growth, {sizes} devices", growth, "", "", "≤ 5 min at 100k",
                        _met(all(r.get("finished") for r in runs) and runs[-1]["wall_seconds"] <= 300), cmd))
    return rows


BENCHES = (
    Bench("peers", ("-m", "bench.bench_peers", "--json"), 1500, peers_rows),
    Bench("ingest", ("-m", "bench.bench_broker_ingest", "--json"), 900, ingest_rows),
    Bench("commit_to_applied", ("-m", "bench.bench_commit_to_applied", "--json"), 600, c2a_rows),
    Bench("fetch", ("-m", "bench.bench_fetch"), 600, fetch_rows),
    Bench("footprint", ("-m", "bench.bench_footprint", "--json"), 600, footprint_rows),
    Bench("rollout", ("-m", "bench.bench_rollout", "--sizes", "10000,30000,100000", "--timeout", "600"), 3600,
          rollout_rows),
    Bench("rollout_pg", ("-m", "bench.bench_rollout", "--devices", "100000", "--timeout", "600",
                         "--store", "postgresql"), 1800, rollout_rows),
    Bench("rollout_pg2", ("-m", "bench.bench_rollout", "--devices", "100000", "--timeout", "600",
                          "--store", "postgresql", "--replicas", "2"), 1800, rollout_rows),
)


def run_bench(bench: Bench) -> tuple[list[Row], dict[str, Any]]:
    """Run one benchmark, keep its output in bench/out, and read its rows (or a gap row on failure)."""
    cmd = "python " + " ".join(bench.args)
    module = bench.args[1] if bench.args[0] == "-m" else ""
    if module and not (REPO / (module.replace(".", "/") + ".py")).is_file():
        return [Row(f"{bench.name}: not measured", "—", "", "", "", f"gap: {module} does not exist", cmd)], {}
    print(f"== {cmd}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, *bench.args], cwd=REPO, capture_output=True, text=True,
                              timeout=bench.timeout, check=False)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr, rc = f"timed out after {bench.timeout:.0f} s", -1
    seconds = time.monotonic() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    begun = datetime.now(UTC) - timedelta(seconds=seconds)
    (OUT / f"{bench.name}.txt").write_text(f"$ {cmd}\n# exit {rc}, {seconds:.1f} s, started {begun.isoformat()}\n"
                                           f"{stdout}{_STDERR_MARK}{stderr}")
    print(f"   exit {rc} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return _rows_of(bench, cmd, stdout, stderr, rc, {"seconds": seconds, "rc": rc, "stdout": stdout,
                                                        "stderr": stderr, "started": begun})


_STDERR_MARK = "\n--- stderr\n"
_HEADER = re.compile(r"^\$ (?P<cmd>.*)\n# exit (?P<rc>-?\d+), (?P<s>[\d.]+) s, started (?P<at>\S+)\n")


def reread_bench(bench: Bench) -> tuple[list[Row], dict[str, Any]]:
    """The rows of a benchmark from the raw output a previous run kept in bench/out (a gap if there is none)."""
    cmd = "python " + " ".join(bench.args)
    path = OUT / f"{bench.name}.txt"
    text = path.read_text() if path.is_file() else ""
    head = _HEADER.match(text)
    if head is None:
        return [Row(f"{bench.name}: not measured", "—", "", "", "", "gap: no raw output in bench/out", cmd)], {}
    stdout, _, stderr = text[head.end():].partition(_STDERR_MARK)
    rc = int(head["rc"])
    meta = {"seconds": float(head["s"]), "rc": rc, "stdout": stdout, "stderr": stderr,
            "started": datetime.fromisoformat(head["at"])}
    return _rows_of(bench, cmd, stdout, stderr, rc, meta)


def _rows_of(bench: Bench, cmd: str, stdout: str, stderr: str, rc: int,
             meta: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    if rc != 0 and not stdout.strip():
        return [Row(f"{bench.name}: not measured", "—", "", "", "",
                    f"gap: exit {rc}: {stderr.strip().splitlines()[-1][:120] if stderr.strip() else ''}", cmd)], meta
    try:
        return bench.rows(stdout, cmd), meta
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        return [Row(f"{bench.name}: output not understood", "—", "", "", "", f"gap: {exc!r}"[:140], cmd)], meta


def machine() -> str:
    """One line naming the machine the figures come from."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    git = subprocess.run(["git", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return (f"{os.cpu_count()} × {model}, {mem:.0f} GiB RAM, Linux {platform.release()}, Python "
            f"{platform.python_version()}, {git}, {mosq.strip() or 'mosquitto'}")


def render(rows: list[Row], metas: dict[str, dict[str, Any]], started: datetime, total: float,
           notes: list[str]) -> str:
    """The Markdown document."""
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`python -m bench.run_all`); do not edit by hand. Every figure sits beside",
           "its reference measured in the same run on the same machine; medians of several runs unless the row",
           "says otherwise. Absolute times depend on the machine; the ratios are the point.", "",
           f"- run: {started:%Y-%m-%d %H:%M} UTC, {total / 60:.1f} minutes in all",
           f"- machine: {machine()}", ""]
    if "peers" in metas and metas["peers"].get("stdout"):
        try:
            peers = _json_tail(metas["peers"]["stdout"])["peers"]
            out += ["- peers (installed by the bench into `bench/.peers-venv`): "
                    + ", ".join(f"{k} {v}" for k, v in peers.items()), ""]
        except (ValueError, KeyError):
            pass
    out += ["| figure | value | reference (same run) | ratio | goal | met | command |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {r.figure} | {r.value} | {r.reference} | {r.ratio} | {r.goal} | {r.met} | `{r.command}` |"
            for r in rows]
    out += ["", "## Commit to applied beside the peers' default poll intervals", "",
            "Documented defaults of how often each peer looks for a new desired state when no webhook or",
            "push notification is set up — the delay before a device even starts to apply a commit:", "",
            "| system | default | setting | source |", "|---|---|---|---|",
            "| Argo CD | 120 s + up to 60 s jitter (a change is seen 2–3 min later) | `timeout.reconciliation`, "
            "`timeout.reconciliation.jitter` in `argocd-cm` | Argo CD operator manual, `argocd-cm.yaml`; FAQ "
            "\"How often does Argo CD check for changes to my Git or Helm repository?\" |",
            "| Rancher Fleet | 15 s | `GitRepo.spec.pollingInterval` | Fleet docs, GitRepo resource reference |",
            "| Mender | 1800 s (30 min) | `UpdatePollIntervalSeconds` | Mender docs, client polling intervals |",
            "| edge-fleet (this run) | see the commit-to-applied rows above: the Git host's webhook wakes the "
            "fleet server's Git watcher, whose nudge makes the device fetch at once; the server's own poll "
            "(`git.poll_interval`, 60 s) and the device's (`intervals.poll`, 300 s) are only the fallbacks | | |", ""]
    out += ["## Notes: goals not met and what limits them", "", *notes, ""]
    out += ["## Rerun", "", "```", "make bench            # every benchmark, then this file",
            "python -m bench.run_all --only peers,footprint   # some of them (the rest keep no row)", "```", "",
            "Raw output of each benchmark of the last run is in `bench/out/` (not committed). See",
            "[bench/README.md](../bench/README.md) for what each one does.", ""]
    return "\n".join(out)


def _receipt_notes(stdout: str | None) -> list[str]:
    """The note on the rollout's receipt delay: the server's share beside the simulated devices' own."""
    if not stdout:
        return []
    try:
        runs = _json_tail(stdout).get("runs", [])
        sizes = "; ".join(
            f"{r['devices']:,} devices: {100 * r['receive_lag']['over_5s_share']:.1f} % at the fleet server, "
            f"{100 * r['probe_delivery']['over_5s_share']:.1f} % at the idle subscriber"
            for r in runs if r.get("receive_lag", {}).get("over_5s_share") is not None
            and r.get("probe_delivery", {}).get("over_5s_share") is not None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    if not sizes:
        return []
    return [
        "- **Receipt delay during the rollout (no goal).** The ingest-lag rows measure the server's own side: "
        "how long a report it received waits for its commit. The receipt rows measure from each report's "
        f"`ts` to its receipt, for every report at the fleet server and for 50 devices' reports at an idle "
        f"MQTT subscriber on the same broker; reports more than 5 s late: {sizes}. Where the idle subscriber "
        "sees reports late too, the simulated devices send them late: two Python processes publish for "
        "every device on the same 2 cores as the broker and the server, and a wave start makes tens of "
        "thousands of devices answer within 4 s. Where only the fleet server sees them late, its MQTT "
        "reading fell behind the broker during those bursts: the reports waited at the broker, not in the "
        "server, so the backlog age does not show it."]


def notes_for(metas: dict[str, dict[str, Any]]) -> list[str]:
    """Measured explanations (not guesses) for the figures that need one, from the benchmarks' own output."""
    notes: list[str] = []
    pe = metas.get("peers", {}).get("stdout")
    if pe:
        try:
            r = _json_tail(pe)
            cli = r["groups"]["agent_pyinfra"]
            warm = r["groups"]["in_process"]
            once, synced, start = (cli["median_seconds"]["agent_cli_noop"], warm["median_seconds"]["agent_warm_noop"],
                                   r["python_start_seconds"])
            notes.append(
                f"- **The one-shot command's fixed cost.** `edge-agent sync --once` with nothing to change in "
                f"{cli['files']} files took {_ms(once)}: {_ms(start)} of bare interpreter start-up, "
                f"{_ms(synced)} for the sync itself (the in-process figure), and "
                f"{_ms(once - synced - start)} for what every new process pays once (imports, opening the state "
                "database, fetching the mirror's ref, reading and checking the release, parsing its bundles). "
                "The daemon does not pay it; its in-process figures are compared only with the baseline writer "
                "in-process, and the peers (whole processes) only with the whole `edge-agent sync --once` "
                "process applying the same number of files. The project's modules are byte-compiled first, as "
                "the .deb ships them (`compileall --invalidation-mode checked-hash`).")
        except (ValueError, KeyError):
            pass
    notes.append(
        "- **The daemon's no-op and first apply (profiled by hand, 2026-11 and 2026-12, `cProfile` and "
        "timers around `edge_agent.agent.sync_once` on the 500-file release of `bench_peers`).** The warm "
        "no-op used to spend most of its time re-reading and re-parsing a release whose commit had not "
        "changed; the daemon now keeps the last verified commit and its desired state (`SyncCache`, which "
        "the warm figures above use) with each resource's recorded spec, re-checking expiry and the "
        "rollback floor, reading the managed resources once (their JSON decoded only when used) and "
        "observing the device, each directory walked once per plan (`FsRoot.observing`). What remains is "
        "observing 500 files (an `lstat`, an `O_NOFOLLOW` open and a SHA-256 each, where the baseline "
        "opens and hashes each file by path) and the plan's own bookkeeping. The first apply's extra time over the baseline goes to the first fetch and "
        "signature check and to the transaction journal: one durable SQLite commit per change, before the "
        "change is made, so that a power cut at any point can be undone; the baseline keeps no journal. "
        "Journaling all changes in one commit before the first one was tried and refused: a change's "
        "backup must describe the device as the earlier changes left it (a symlink created by an earlier "
        "change must make a later write under it fail before anything is journaled for it).")
    ing = metas.get("ingest", {})
    if ing.get("stdout"):
        try:
            r = _json_tail(ing["stdout"])
            locked = ing.get("stderr", "").count("database is locked")
            rates = "; ".join(
                f"{ph['workers']} ingest process(es) {ph['ingest']['rate']:,.0f} msg/s beside "
                f"{ph['bare_paho'].get('processes', 1)} bare subscriber(s) {ph['bare_paho']['rate']:,.0f} msg/s "
                f"and one `mosquitto_sub` {ph['mosquitto_sub']['rate']:,.0f} msg/s"
                + (f", the publishers offering {ph['publishers']['rate']:,.0f} msg/s" if "publishers" in ph else "")
                for ph in r["phases"])
            notes.append(
                f"- **Ingest and shared subscriptions.** Measured on {r['cpus']} CPUs, absolute rates of each "
                f"phase: {rates}. In a shared phase the N ingest processes are compared with N bare subscribers "
                "sharing a group of their own, the same work split the same way; a single bare subscriber "
                "would itself slow down as processes are added, and a ratio to it would read as capacity that "
                "is not there. The shared subscription splits the reports between processes as expected (each "
                "stored once), but every ingest process commits to the same SQLite file, which takes one "
                f"writer at a time: the run logged {locked} batch commit(s) that found the database locked and "
                "were retried (nothing lost: unacknowledged messages stay at the broker). With the broker, four "
                "publisher processes, `mosquitto_sub` and the bare subscribers on the same cores, extra Python "
                "processes add contention, not capacity, on this machine; compare the absolute rates across "
                "phases, not the ratios, for what more processes bring. A consumer whose rate equals the "
                "publishers' kept up with what was offered: its capacity may be higher.")
        except (ValueError, KeyError, ZeroDivisionError):
            pass
    notes += _receipt_notes(metas.get("rollout", {}).get("stdout"))
    fp = metas.get("footprint", {}).get("stdout")
    if fp:
        try:
            r = _json_tail(fp)
            added = r["imports"]["added_mib"]
            biggest = sorted(added.items(), key=lambda kv: kv[1], reverse=True)
            notes.append(
                "- **RSS.** Every agent process here runs as the package runs it (docs/packaging.md): with "
                "`-OO`, as the packaged `edge-agent` command does, loading optimised byte code (docstrings "
                "and asserts stay out of memory), and without dulwich's compiled accelerators, which the "
                "package leaves out of its venv (dulwich runs its own Python instead). "
                f"A bare interpreter peaks at {r['imports']['bare_interpreter_mib']:.1f} MiB here. Imported "
                "alone in a fresh interpreter (VmHWM after minus before), these modules add: "
                + ", ".join(f"`{m}` +{v:.1f}" for m, v in biggest) + " MiB (overlapping: `ssl`, `http`, "
                "`email` and `urllib` are shared by paho and dulwich's network client; `dulwich.client` is "
                "loaded only by a fetch over the network: the daemon rows marked git://, http:// and https:// "
                "measure it with a mirror served by `git daemon` and by `git http-backend`, the others with "
                "a local `file://` mirror; `psutil` is no longer imported by the agent at all: its row is "
                "kept for comparison). Slowest imports of `edge_agent.daemon` (cumulative ms, "
                "`python -X importtime`): "
                + ", ".join(f"{n} {ms:.0f}" for n, ms in r["importtime_ms"][:8]) + ".")
            notes += _footprint_setting_notes(r)
        except (ValueError, KeyError):
            pass
    return notes


def _footprint_setting_notes(r: dict[str, Any]) -> list[str]:
    """What each footprint setting saves and what the alternatives would add (absent from older
    outputs)."""
    notes: list[str] = []
    settings, marginal = r.get("settings"), r.get("marginal")
    if settings:
        base = r["oneshot_peak_rss_mib"]
        notes.append(
            f"- **What each setting saves.** `edge-agent sync --once` peaks at {base:.1f} MiB as packaged and "
            f"takes {r['oneshot_seconds']:.2f} s; with one setting undone at a time (the runs of every variant "
            "took turns with those): "
            + "; ".join(f"{name} {c['mib']:.1f} MiB ({c['mib'] - base:+.1f}, {c['seconds']:.2f} s)"
                        for name, c in settings.items() if name != PACKAGED) + ".")
    if marginal:
        notes.append(
            "- **What the alternatives would add** to a process holding the daemon's imports (VmHWM after "
            "minus before): " + "; ".join(f"`{name}` {mib:+.1f} MiB" for name, mib in marginal.items())
            + ". The HTTP client runs on the standard library's `http.client` instead of dulwich's urllib3 "
            "client, and TLS contexts read the trust store's CAs on demand (`edge_core/tls.py`).")
    http, https = r.get("daemon_http"), r.get("daemon_https")
    if http and https:
        notes.append(
            f"- **https over http.** The daemon peaks {https['peak_rss_apply_mib'] - http['peak_rss_apply_mib']:.1f} "
            "MiB higher with its mirror over https than over http: the TLS handshake and the certificate "
            "verification in OpenSSL.")
    return notes


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the Markdown table; exit 1 when a benchmark left a gap."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--only", default="", help="comma-separated names: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--from-out", action="store_true",
                    help="do not run anything: re-render the document from the raw output kept in bench/out")
    args = ap.parse_args(argv)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    started, t0 = datetime.now(UTC), time.monotonic()
    rows: list[Row] = []
    metas: dict[str, dict[str, Any]] = {}
    for bench in BENCHES:
        if wanted and bench.name not in wanted:
            continue
        bench_rows, meta = reread_bench(bench) if args.from_out else run_bench(bench)
        rows += bench_rows
        metas[bench.name] = meta
    if args.from_out:
        total = sum(m.get("seconds", 0.0) for m in metas.values())
        started = min((m["started"] for m in metas.values() if "started" in m), default=started)
    else:
        total = time.monotonic() - t0
    args.out.write_text(render(rows, metas, started, total, notes_for(metas)))
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}", file=sys.stderr)
    return 1 if any(r.met.startswith("gap") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
