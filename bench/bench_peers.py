"""Agent reconcile vs Ansible and pyinfra: the same desired state, first apply and no-op re-run.

The desired state is N files (about 1 KB each, in 20 directories, mode 0644) under a temporary
root, the same one :mod:`bench.bench_apply` builds. Every comparison sets the same work on both
sides, in the same run on the same machine, in three groups:

- ``all_peers``: whole processes, ``--common-files`` files each (default 100: Ansible needs more
  than half a second per file, so it cannot take the full count in every run):
  ``edge-agent sync --once`` (a signed release of that many files in a ``file://`` mirror; a fresh
  process each time, interpreter start-up, fetch and signature check included), ``pyinfra @local``
  with one ``files.put`` per file, and ``ansible-playbook -c local`` with ``copy`` in a loop;
- ``agent_pyinfra``: whole processes, ``--files`` files each (default 500): the same agent command
  and pyinfra;
- ``in_process``: ``--files`` files each, no process start-up on either side:
  ``edge_agent.agent.sync_once`` in a warm interpreter (what the daemon pays per sync, its
  ``SyncCache`` kept between the two calls) and the minimal Python writer of
  :mod:`bench.bench_apply` (digest compare, temp + fsync + rename).

A warm in-process figure is never set against a whole process of a peer. Each tool applies into a
fresh empty root (first apply), then runs again with nothing to change (no-op); every root is
checked afterwards: every file present with the right bytes and mode. The peers are installed by
this command into ``bench/.peers-venv`` (``pip install ansible-core pyinfra``), never into the
project's virtualenv. Prints a table per group, and with ``--json`` a JSON object instead.

    python -m bench.bench_peers [--files 500] [--common-files 100] [--runs 3] [--ansible-runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.bench_apply import (
    BIN,
    baseline_apply,
    cli_sync,
    compile_like_the_package,
    contents,
    device_config,
    make_release,
    sh,
    timed,
)

__all__ = ["PEERS_VENV", "comparison_group", "ensure_peers", "main", "peer_env", "run"]

PEERS_VENV = Path(__file__).resolve().parent / ".peers-venv"
PEER_PACKAGES = ("ansible-core", "pyinfra")
MODE = 0o644


# --- the peers' own virtualenv ---------------------------------------------------------------------

def _tools_present(venv: Path) -> bool:
    return all((venv / "bin" / tool).is_file() for tool in ("ansible-playbook", "pyinfra", "python"))


def ensure_peers(venv: Path = PEERS_VENV) -> Path:
    """Create ``venv`` and ``pip install ansible-core pyinfra`` into it unless both are there already.

    Returns the virtualenv's ``bin`` directory.

    Raises:
        SystemExit: the virtualenv cannot be created or the installation failed.
    """
    if _tools_present(venv):
        return venv / "bin"
    print(f"installing {' '.join(PEER_PACKAGES)} into bench/{venv.name} (once) ...", file=sys.stderr)
    base_python = getattr(sys, "_base_executable", sys.executable)
    for argv in ([base_python, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PEER_PACKAGES]):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"cannot install the peer tools: {proc.stderr.strip()[-500:]}")
    if not _tools_present(venv):
        raise SystemExit(f"{venv} lacks ansible-playbook or pyinfra after pip install")
    return venv / "bin"


def peer_env(scratch: Path, venv: Path = PEERS_VENV) -> dict[str, str]:
    """The environment the peers run in: their venv first on PATH, their state and HOME in ``scratch``."""
    (scratch / "ansible").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(scratch),
        "ANSIBLE_HOME": str(scratch / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(scratch / "ansible" / "tmp"),
        "ANSIBLE_REMOTE_TMP": str(scratch / "ansible" / "remote-tmp"),
        "ANSIBLE_PYTHON_INTERPRETER": str(venv / "bin" / "python"),
        "ANSIBLE_NOCOWS": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
    })
    return env


def peer_versions(venv: Path = PEERS_VENV) -> dict[str, str]:
    """The installed versions of the peer packages, by package name."""
    code = ("import importlib.metadata as m, json; "
            f"print(json.dumps({{p: m.version(p) for p in {list(PEER_PACKAGES)!r}}}))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True)
    versions: dict[str, str] = json.loads(proc.stdout)
    return versions


# --- the desired state, as each peer spells it -----------------------------------------------------

def write_sources(base: Path, files: dict[str, bytes]) -> Path:
    """Write every file's content once under ``base/src`` (device path layout); return that directory."""
    src = base / "src"
    for path, data in files.items():
        target = src / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return src


def pyinfra_deploy(base: Path, src: Path, files: dict[str, bytes], root: Path) -> Path:
    """A pyinfra deploy file putting every file under ``root``; return its path."""
    rel = [p.lstrip("/") for p in files]
    deploy = base / f"deploy-{root.name}.py"
    deploy.write_text(
        "from pyinfra.operations import files\n"
        f"SRC = {str(src)!r}\nROOT = {str(root)!r}\nFILES = {rel!r}\n"
        "for rel in FILES:\n"
        f"    files.put(name=rel, src=f'{{SRC}}/{{rel}}', dest=f'{{ROOT}}/{{rel}}', mode='{MODE:o}',\n"
        "              create_remote_dir=True)\n")
    return deploy


def ansible_playbook(base: Path, src: Path, files: dict[str, bytes], root: Path) -> Path:
    """An Ansible playbook: the directories, then ``copy`` in a loop over every file; return its path."""
    rel = [p.lstrip("/") for p in files]
    dirs = sorted({str(Path(r).parent) for r in rel})
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "directories", "ansible.builtin.file": {"path": f"{root}/{{{{ item }}}}", "state": "directory",
                                                          "mode": "0755"}, "loop": dirs},
        {"name": "files", "ansible.builtin.copy": {"src": f"{src}/{{{{ item }}}}", "dest": f"{root}/{{{{ item }}}}",
                                                    "mode": f"0{MODE:o}"}, "loop": rel},
    ]}]
    path = base / f"play-{root.name}.json"  # JSON is YAML: no quoting surprises in the templates
    path.write_text(json.dumps(play))
    return path


def run_peer(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    """Run one peer command; fail loudly with the tail of its output."""
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{Path(argv[0]).name} failed ({proc.returncode}): "
                         f"{(proc.stdout + proc.stderr).strip()[-800:]}")


def check_root(root: Path, files: dict[str, bytes]) -> None:
    """Every desired file is under ``root`` with its bytes and mode.

    Raises:
        SystemExit: a file is missing or differs: the figure would be meaningless.
    """
    for path, data in files.items():
        target = root / path.lstrip("/")
        st = target.stat()
        if (st.st_mode & 0o7777) != MODE or target.read_bytes() != data:
            raise SystemExit(f"{target} does not hold the desired content and mode {MODE:o}")


# --- the benchmark -----------------------------------------------------------------------------------

TOOLS_ALL = ("agent_cli", "pyinfra", "ansible")
"""Whole processes compared at the common count: ``edge-agent sync --once``, pyinfra, Ansible."""
TOOLS_PAIR = ("agent_cli", "pyinfra")
"""Whole processes compared at the full count (Ansible is too slow to take it in every run)."""
TOOLS_WARM = ("agent_warm", "baseline")
"""In-process figures at the full count: the agent's sync in a warm interpreter, the minimal writer."""


def comparison_group(samples: dict[str, list[float]], files: int, tools: tuple[str, ...],
                     runs: int) -> dict[str, Any]:
    """Medians, per-file medians and the runs behind them for ``tools`` applying ``files`` files."""
    med = {f"{t}_{ph}": statistics.median(samples[f"{t}_{ph}"]) for t in tools for ph in ("first", "noop")}
    return {"files": files, "tools": list(tools), "runs": runs, "median_seconds": med,
            "per_file_seconds": {k: v / files for k, v in med.items()},
            "samples": {k: samples[k] for k in med}}


def run(n_files: int, n_common: int, runs: int, ansible_runs: int) -> dict[str, Any]:
    """Run every tool ``runs`` times (Ansible ``ansible_runs`` times); return medians by comparison group.

    Three groups, each comparing the same work: ``all_peers`` (whole processes of the agent, pyinfra
    and Ansible, ``n_common`` files each), ``agent_pyinfra`` (whole processes of the agent and
    pyinfra, ``n_files`` each) and ``in_process`` (the agent's sync in a warm interpreter and the
    minimal Python writer, ``n_files`` each, no process start-up on either side).
    """
    from edge_agent.agent import SyncCache, sync_once
    from edge_agent.config import load_config

    peer_bin = ensure_peers()
    compile_like_the_package()
    base = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        files = contents(n_files)
        common = contents(n_common)
        releases = {}
        for n in sorted({n_files, n_common}):
            (base / f"release{n}").mkdir()
            releases[n] = make_release(base / f"release{n}", n)
        src = write_sources(base, files)
        env = peer_env(base / "peer-home")
        samples: dict[str, list[float]] = {}

        def add(key: str, seconds: float) -> None:
            samples.setdefault(key, []).append(seconds)

        def agent_cli(tag: str, n: int, want: dict[str, bytes]) -> None:
            url, trust = releases[n]
            cfg = device_config(base, f"cli{n}-{tag}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg)
            add(f"agent_cli_first@{n}", timed(lambda: cli_sync(cfg)))
            add(f"agent_cli_noop@{n}", timed(lambda: cli_sync(cfg)))
            check_root(cfg.parent / "root", want)

        def pyinfra(tag: str, n: int, want: dict[str, bytes]) -> None:
            root = base / f"pyinfra{n}-{tag}"
            argv = [str(peer_bin / "pyinfra"), "@local", str(pyinfra_deploy(base, src, want, root)), "-y"]
            add(f"pyinfra_first@{n}", timed(lambda: run_peer(argv, env, base)))
            add(f"pyinfra_noop@{n}", timed(lambda: run_peer(argv, env, base)))
            check_root(root, want)

        for run_no in range(runs):
            tag = str(run_no)
            # whole processes, the full count: the agent and pyinfra
            agent_cli(tag, n_files, files)
            pyinfra(tag, n_files, files)
            # whole processes, the common count: the agent, pyinfra and Ansible
            if run_no < ansible_runs:
                if n_common != n_files:
                    agent_cli(tag, n_common, common)
                    pyinfra(tag, n_common, common)
                aroot = base / f"ansible{n_common}-{tag}"
                play = ansible_playbook(base, src, common, aroot)
                argv = [str(peer_bin / "ansible-playbook"), "-c", "local", "-i", "localhost,", str(play)]
                add(f"ansible_first@{n_common}", timed(partial(run_peer, argv, env, base)))
                add(f"ansible_noop@{n_common}", timed(partial(run_peer, argv, env, base)))
                check_root(aroot, common)
            # in-process, the full count: the agent's sync in a warm interpreter and the minimal writer
            url, trust = releases[n_files]
            cfg2 = device_config(base, f"warm{tag}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg2)
            config = load_config(cfg2)
            cache = SyncCache()  # what the daemon keeps between syncs
            add(f"agent_warm_first@{n_files}",
                timed(partial(sync_once, config, now=datetime.now(UTC), cache=cache)))
            add(f"agent_warm_noop@{n_files}",
                timed(partial(sync_once, config, now=datetime.now(UTC), cache=cache)))
            check_root(cfg2.parent / "root", files)
            broot = base / f"baseline{tag}"
            broot.mkdir()
            add(f"baseline_first@{n_files}", timed(partial(baseline_apply, broot, files)))
            add(f"baseline_noop@{n_files}", timed(partial(baseline_apply, broot, files)))
            check_root(broot, files)

            add("python_start", timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)))
            print(f"run {run_no + 1}/{runs} done", file=sys.stderr)

        def of(n: int) -> dict[str, list[float]]:
            return {k.rsplit("@", 1)[0]: v for k, v in samples.items() if k.endswith(f"@{n}")}

        groups = {
            "all_peers": comparison_group(of(n_common), n_common, TOOLS_ALL, min(runs, ansible_runs)),
            "agent_pyinfra": comparison_group(of(n_files), n_files, TOOLS_PAIR, runs),
            "in_process": comparison_group(of(n_files), n_files, TOOLS_WARM, runs),
        }
        return {"files": n_files, "common_files": n_common, "runs": runs, "ansible_runs": ansible_runs,
                "peers": peer_versions(), "python_start_seconds": statistics.median(samples["python_start"]),
                "groups": groups}
    finally:
        shutil.rmtree(base, ignore_errors=True)


LABELS = {"agent_cli": "edge-agent sync --once (whole process)", "agent_warm": "agent sync, warm process (in-process)",
          "baseline": "baseline writer (in-process)", "pyinfra": "pyinfra @local files.put (whole process)",
          "ansible": "ansible-playbook -c local copy (whole process)"}


def print_table(r: dict[str, Any]) -> None:
    """Print the figures of :func:`run` as Markdown tables, one per comparison group."""
    print(f"# reconcile, median of {r['runs']} runs (Ansible {r['ansible_runs']}); peers {r['peers']}")
    for name, g in r["groups"].items():
        med, pf = g["median_seconds"], g["per_file_seconds"]
        print(f"\n## {name}: {g['files']} files each")
        print("| tool | first apply | per file | no-op | per file |")
        print("|---|---|---|---|---|")
        for tool in g["tools"]:
            print(f"| {LABELS[tool]} | {med[tool + '_first'] * 1000:.0f} ms | {pf[tool + '_first'] * 1000:.3f} ms "
                  f"| {med[tool + '_noop'] * 1000:.1f} ms | {pf[tool + '_noop'] * 1000:.3f} ms |")
        first, *others = g["tools"]
        for other in others:
            for ph in ("first", "noop"):
                a, b = med[f"{first}_{ph}"], med[f"{other}_{ph}"]
                print(f"{ph}: {other} / {first} = {b / a:.2f}x" if name != "in_process"
                      else f"{ph}: {first} / {other} = {a / b:.2f}x")
    print(f"\ninterpreter start-up (python -c pass): {r['python_start_seconds'] * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, or JSON with ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--files", type=int, default=500, help="files of the agent-vs-pyinfra and in-process groups")
    ap.add_argument("--common-files", type=int, default=100,
                    help="files every tool (the agent, pyinfra and Ansible) applies in the three-way group")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ansible-runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    result = run(args.files, min(args.common_files, args.files), args.runs,
                 min(args.ansible_runs, args.runs))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
