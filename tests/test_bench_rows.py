"""The rows ``bench.run_all`` renders compare the same work on both sides.

The readers are fed the JSON shape the benchmarks print (built with the benchmarks' own helpers
where they have one); no figure here is a timing assertion.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bench.bench_fetch import GIT, OURS, result_line
from bench.bench_peers import TOOLS_ALL, TOOLS_PAIR, TOOLS_WARM, comparison_group
from bench.run_all import c2a_rows, fetch_rows, ingest_rows, peers_rows

PEER_NAMES = ("ansible", "pyinfra")


def _peers_output(n_files: int = 500, n_common: int = 100) -> str:
    def samples(tools: tuple[str, ...], seconds: float) -> dict[str, list[float]]:
        return {f"{t}_{ph}": [seconds * (i + 1)] * 3 for i, t in enumerate(tools) for ph in ("first", "noop")}

    groups = {"all_peers": comparison_group(samples(TOOLS_ALL, 0.5), n_common, TOOLS_ALL, 3),
              "agent_pyinfra": comparison_group(samples(TOOLS_PAIR, 1.0), n_files, TOOLS_PAIR, 3),
              "in_process": comparison_group(samples(TOOLS_WARM, 0.02), n_files, TOOLS_WARM, 3)}
    return json.dumps({"files": n_files, "common_files": n_common, "runs": 3, "ansible_runs": 3,
                       "peers": {"ansible-core": "x", "pyinfra": "y"}, "python_start_seconds": 0.02,
                       "groups": groups})


def _counts(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"(\d+) files", text)}


def test_every_peer_row_gives_both_sides_the_same_file_count() -> None:
    rows = peers_rows(_peers_output(500, 100), "cmd")
    against_peers = [r for r in rows if any(p in r.reference.lower() for p in PEER_NAMES)]
    assert len(against_peers) == 6  # Ansible and pyinfra at 100, pyinfra at 500; first apply and no-op
    for row in against_peers:
        assert len(_counts(row.figure)) == 1, row
        assert _counts(row.figure) == _counts(row.reference), row
    assert {c for r in against_peers if "ansible" in r.reference.lower() for c in _counts(r.figure)} == {100}


def test_in_process_figures_are_set_only_against_the_in_process_baseline() -> None:
    rows = peers_rows(_peers_output(), "cmd")
    warm = [r for r in rows if "in-process" in r.figure]
    assert len(warm) == 2
    for row in warm:
        assert "baseline writer in-process" in row.reference
        assert not any(p in row.reference.lower() for p in PEER_NAMES)
    for row in rows:
        if any(p in row.reference.lower() for p in PEER_NAMES):
            assert "whole process" in row.figure
            assert "`edge-agent sync --once`" in row.figure


def _phase(workers: int, shared: bool, ingest: float, bare: float, msub: float,
           bare_processes: int) -> dict[str, Any]:
    def fig(rate: float) -> dict[str, float | int]:
        return {"received": 1000, "seconds": 1000 / rate, "rate": rate, "loss": 0}

    bare_fig = {**fig(bare), "processes": bare_processes}
    return {"workers": workers, "shared": shared, "total": 1000, "ingest": {**fig(ingest), "dropped": 0},
            "bare_paho": bare_fig, "mosquitto_sub": fig(msub), "publishers": fig(5300)}


def test_shared_ingest_is_compared_with_as_many_bare_subscribers_and_shows_absolute_rates() -> None:
    out = json.dumps({"messages": 1000, "devices": 10, "publishers": 4, "cpus": 2, "phases": [
        _phase(1, False, 4000, 5000, 6000, 1), _phase(4, True, 4800, 5200, 4800, 4)]})
    rows = ingest_rows(out, "cmd")
    shared = [r for r in rows if "4 processes" in r.figure]
    assert len(shared) == 2
    against_bare = next(r for r in shared if "bare paho" in r.reference)
    assert "4 bare paho processes sharing" in against_bare.reference
    assert against_bare.ratio == "0.92×"
    assert "4,800 msg/s" in against_bare.value
    assert "publishers offered 5,300 msg/s" in against_bare.reference
    against_msub = next(r for r in shared if "mosquitto_sub" in r.reference)
    assert against_msub.ratio == ""
    assert "absolute" in against_msub.figure


def test_a_shared_phase_measured_against_a_single_bare_subscriber_gets_no_ratio() -> None:
    out = json.dumps({"messages": 1000, "devices": 10, "publishers": 4, "cpus": 2, "phases": [
        _phase(4, True, 4800, 3300, 4800, 1)]})
    row = next(r for r in ingest_rows(out, "cmd") if "bare paho" in r.reference)
    assert row.ratio == "n/a"
    assert row.met == "**not met**"


def test_commit_to_applied_rows_name_the_whole_path_and_its_stages() -> None:
    def st(p50: float) -> dict[str, float]:
        return {"p50": p50, "p95": p50 * 1.5, "max": p50 * 2}

    out = json.dumps({"commits": 30, "bundles": 4, "files": 40, "missing_nudges": 0,
                      "stats": {"push_to_applied": st(0.45), "push": st(0.1), "webhook_to_nudge": st(0.13),
                                "nudge_to_applied": st(0.2)}})
    rows = c2a_rows(out, "cmd")
    assert "webhook" in rows[0].figure
    assert "40 files in 4 bundles" in rows[0].figure
    assert rows[0].value == "0.450 s"
    assert rows[0].met == "**met**"
    assert rows[1].value == "0.675 s (0.900 s)"
    assert "webhook → nudge 130 ms" in rows[2].value


def test_the_fetch_row_reads_the_lines_the_fetch_benchmark_prints() -> None:
    output = "\n".join(["mirror: 5000 commits over 200 files built in 2.49s", result_line(OURS, 0.0571, 350),
                        result_line(GIT, 0.1045, 5215), "time ratio dulwich/git: 0.55"])
    [row] = fetch_rows(output, "cmd")
    assert (row.value, row.reference) == ("57 ms, 350 bytes", "`git fetch` 104 ms, 5,215 bytes")
    assert row.met == "**met**"
