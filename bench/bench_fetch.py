"""Incremental fetch of one one-file commit: edge_core.source (dulwich, shallow) vs `git fetch`.

A mirror with 5,000 commits over 200 files is built with `git fast-import`, served by `git daemon`
on loopback. For each of 5 runs one new commit changing one file is pushed, then both clients
fetch it: a shallow dulwich cache (edge_core.source.Source) and a full `git clone`. Prints the
median wall time and the pack bytes each received.

    python -m bench.bench_fetch
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_core.source import Source
from tests.support.gitrepo import WorkRepo, git, make_bare
from tests.support.mirror import GitDaemon

COMMITS = 5000
FILES = 200
RUNS = 5



OURS = "edge_core.source (dulwich)"
GIT = "git fetch (full clone)"
"""The names of the two clients in the result lines (``bench/run_all.py`` reads them)."""


def result_line(client: str, median_seconds: float, median_bytes: int) -> str:
    """One result line: the client, its median time (s) and its median pack size (bytes)."""
    return f"{client:<32}{median_seconds:>10.4f}{median_bytes:>14}"

def build_mirror(bare: Path) -> None:
    """Fill ``bare`` with COMMITS commits over FILES files using one `git fast-import` stream."""
    lines: list[bytes] = []
    stamp = 1_700_000_000
    for n in range(COMMITS):
        msg = f"commit {n}".encode()
        lines.append(b"commit refs/heads/main")
        lines.append(b"committer Bench <bench@example.invalid> %d +0000" % (stamp + n))
        lines.append(b"data %d" % len(msg))
        lines.append(msg)
        if n == 0:
            for f in range(FILES):
                body = (f"file {f}\n" + f"setting_{f} = value\n" * 40).encode()
                lines.append(b"M 100644 inline etc/app/f%03d.conf" % f)
                lines.append(b"data %d" % len(body))
                lines.append(body)
        else:
            f = n % FILES
            body = (f"file {f} revision {n}\n" + f"setting_{f} = value\n" * 40).encode()
            lines.append(b"M 100644 inline etc/app/f%03d.conf" % f)
            lines.append(b"data %d" % len(body))
            lines.append(body)
        lines.append(b"")
    git("fast-import", "--quiet", cwd=bare, input_bytes=b"\n".join(lines) + b"\n")


def git_fetch_bytes(clone: Path) -> tuple[float, int]:
    """Run `git fetch` in ``clone``; return (seconds, bytes of the pack it received and kept)."""
    pack_dir = clone / ".git" / "objects" / "pack"
    before = set(pack_dir.glob("*.pack"))
    started = time.perf_counter()
    subprocess.run(["git", "fetch", "--quiet", "origin", "main"], cwd=clone, capture_output=True, check=True)
    elapsed = time.perf_counter() - started
    # transfer.unpackLimit=1 makes git keep every fetched pack as received, so its size is the wire size.
    new = set(pack_dir.glob("*.pack")) - before
    return elapsed, sum(p.stat().st_size for p in new)


def main() -> int:
    """Build the mirror, run the comparison, print a table."""
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "mirrors"
        bare = make_bare(root / "fleet.git")
        started = time.perf_counter()
        build_mirror(bare)
        print(f"mirror: {COMMITS} commits over {FILES} files built in {time.perf_counter() - started:.2f}s")
        work = WorkRepo(tmp / "work")
        git("clone", "--quiet", str(bare), str(work.path))
        git("config", "commit.gpgsign", "false", cwd=work.path)
        with GitDaemon(root) as daemon:
            url = daemon.url("fleet.git")
            clone = tmp / "clone"
            git("clone", "--quiet", url, str(clone))
            git("config", "fetch.unpackLimit", "1", cwd=clone)
            git("config", "transfer.unpackLimit", "1", cwd=clone)
            source = Source(url, "main", tmp / "cache")
            initial = source.fetch()
            print(f"initial shallow dulwich fetch: {initial.bytes_received} bytes")
            d_times: list[float] = []
            d_bytes: list[int] = []
            g_times: list[float] = []
            g_bytes: list[int] = []
            for run in range(RUNS):
                work.commit_and_push(bare, {f"etc/app/f{run:03d}.conf": f"bench run {run}\n"}, f"run {run}")
                t0 = time.perf_counter()
                result = source.fetch()
                d_times.append(time.perf_counter() - t0)
                d_bytes.append(result.bytes_received)
                elapsed, size = git_fetch_bytes(clone)
                g_times.append(elapsed)
                g_bytes.append(size)
            source.close()
        d_med, g_med = statistics.median(d_times), statistics.median(g_times)
        print(f"{'client':<32}{'median s':>10}{'median bytes':>14}")
        print(result_line(OURS, d_med, int(statistics.median(d_bytes))))
        print(result_line(GIT, g_med, int(statistics.median(g_bytes))))
        print(f"time ratio dulwich/git: {d_med / g_med:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
