"""Run one fetch (or one agent sync) in a child process under an address-space limit.

    python -m tests.support.fetch_child '{"mode": "fetch", "url": ..., "cache": ..., "limit_mib": 512}'
    python -m tests.support.fetch_child '{"mode": "sync", "config": ".../agent.yaml", "limit_mib": 512}'
    python -m tests.support.fetch_child '{"mode": "read_tree", "cache": ..., "commit": ..., "limit_mib": 512}'

The modules named in ``"without"`` cannot be imported (give it the compiled modules the agent
package leaves out, and dulwich runs its pure-Python code as on a device); the output's ``loaded``
lists which of the modules named in ``"watch"`` were imported. ``RLIMIT_AS`` is set before dulwich
is imported, so a fetch that inflates a bomb whole fails with ``MemoryError`` inside this child
instead of eating the machine. It prints one JSON object: the outcome (``ok``, the error type and
reason, or the sync outcome and reason) and ``peak_rss_kib``, the peak resident set size of this
program (``VmHWM``: unlike ``ru_maxrss`` it does not carry the parent's peak across ``exec``). Use
:func:`run_child` from a test.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_child"]

_REPO = Path(__file__).resolve().parents[2]


def run_child(args: dict[str, Any], *, timeout: float = 120.0) -> dict[str, Any]:
    """Run this module with ``args`` in a child process; return what it printed (parsed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.fetch_child", json.dumps(args)], cwd=_REPO,
        capture_output=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONPATH": str(_REPO)},
    )
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _fetch(args: dict[str, Any]) -> dict[str, Any]:
    from edge_core.errors import EdgeFleetError  # noqa: PLC0415 - after the rlimit
    from edge_core.gitlimits import FetchLimits  # noqa: PLC0415
    from edge_core.source import Source  # noqa: PLC0415

    limits = FetchLimits(**args.get("limits", {}))
    url = args.get("url", "git://127.0.0.1:9/unused.git")
    with Source(url, "main", Path(args["cache"]), timeout=args.get("timeout", 5.0),
                limits=limits) as source:
        try:
            if args["mode"] == "read_tree":
                files = source.read_tree(args["commit"])
                return {"ok": sorted(files)}
            result = source.fetch()
        except EdgeFleetError as exc:
            return {"error": type(exc).__name__, "reason": str(exc)}
        except MemoryError:
            return {"error": "MemoryError", "reason": ""}
    return {"ok": result.commit}


def _sync(args: dict[str, Any]) -> dict[str, Any]:
    from edge_agent.agent import sync_once  # noqa: PLC0415 - after the rlimit
    from edge_agent.config import load_config  # noqa: PLC0415

    try:
        result = sync_once(load_config(Path(args["config"])))
    except MemoryError:
        return {"error": "MemoryError", "reason": ""}
    return {"outcome": result.outcome, "reason": result.reason}


def main() -> None:
    """Parse the JSON argument, set the address-space limit, run, print the result."""
    args = json.loads(sys.argv[1])
    limit = int(args["limit_mib"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    without = [str(m) for m in args.get("without", [])]
    sys.modules.update(dict.fromkeys(without))
    result = _sync(args) if args["mode"] == "sync" else _fetch(args)
    result["loaded"] = sorted(str(m) for m in args.get("watch", []) if sys.modules.get(m) is not None)
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    result["peak_rss_kib"] = int(status.split()[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
