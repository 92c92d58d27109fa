"""Agent reconcile vs Ansible and pyinfra: the same desired state, first apply and no-op re-run.

The desired state is N files (about 1 KB each, in 20 directories, mode 0644) under a temporary
root, the same one :mod:`bench.bench_apply` builds. It is applied, in the same run on the same
machine, by:

- ``edge-agent sync --once`` (a signed release in a ``file://`` mirror; a fresh process each time,
  interpreter start-up, fetch and signature check included) and ``edge_agent.agent.sync_once`` in
  a warm interpreter (what the daemon pays per sync);
- the minimal Python baseline of :mod:`bench.bench_apply` (digest compare, temp + fsync + rename);
- ``pyinfra @local`` with one ``files.put`` per file;
- ``ansible-playbook -c local`` with the ``copy`` module in a loop over fewer files (default 100:
  Ansible needs more than half a second per file), compared per file.

Each tool applies into a fresh empty root (first apply), then runs again with nothing to change
(no-op); every root is checked afterwards: every file present with the right bytes and mode. The
peers are installed by this command into ``bench/.peers-venv`` (``pip install ansible-core
pyinfra``), never into the project's virtualenv. Prints a table of medians and the per-file ratios,
and with ``--json`` a JSON object instead.

    python -m bench.bench_peers [--files 500] [--ansible-files 100] [--runs 3] [--json]
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

__all__ = ["PEERS_VENV", "ensure_peers", "main", "peer_env", "run"]

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

def run(n_files: int, n_ansible: int, runs: int, ansible_runs: int) -> dict[str, Any]:
    """Run every tool ``runs`` times (Ansible ``ansible_runs`` times); return medians and ratios."""
    from edge_agent.agent import SyncCache, sync_once
    from edge_agent.config import load_config

    peer_bin = ensure_peers()
    compile_like_the_package()
    base = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        files = contents(n_files)
        ans_files = dict(list(files.items())[:n_ansible])
        url, trust = make_release(base, n_files)
        src = write_sources(base, files)
        env = peer_env(base / "peer-home")
        samples: dict[str, list[float]] = {}

        def add(key: str, seconds: float) -> None:
            samples.setdefault(key, []).append(seconds)

        for run_no in range(runs):
            cfg = device_config(base, f"cli{run_no}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg)
            add("agent_cli_first", timed(lambda c=cfg: cli_sync(c)))
            add("agent_cli_noop", timed(lambda c=cfg: cli_sync(c)))
            check_root(cfg.parent / "root", files)

            cfg2 = device_config(base, f"warm{run_no}", url, trust)
            sh(BIN / "edge-agent", "init", "--config", cfg2)
            config = load_config(cfg2)
            cache = SyncCache()  # what the daemon keeps between syncs
            add("agent_daemon_first", timed(lambda c=config, k=cache: sync_once(c, now=datetime.now(UTC), cache=k)))
            add("agent_daemon_noop", timed(lambda c=config, k=cache: sync_once(c, now=datetime.now(UTC), cache=k)))
            check_root(cfg2.parent / "root", files)

            broot = base / f"baseline{run_no}"
            broot.mkdir()
            add("baseline_first", timed(lambda r=broot: baseline_apply(r, files)))
            add("baseline_noop", timed(lambda r=broot: baseline_apply(r, files)))
            check_root(broot, files)

            add("python_start", timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)))

            proot = base / f"pyinfra{run_no}"
            deploy = pyinfra_deploy(base, src, files, proot)
            argv = [str(peer_bin / "pyinfra"), "@local", str(deploy), "-y"]
            add("pyinfra_first", timed(lambda a=argv: run_peer(a, env, base)))
            add("pyinfra_noop", timed(lambda a=argv: run_peer(a, env, base)))
            check_root(proot, files)

            if run_no < ansible_runs:
                aroot = base / f"ansible{run_no}"
                play = ansible_playbook(base, src, ans_files, aroot)
                argv = [str(peer_bin / "ansible-playbook"), "-c", "local", "-i", "localhost,", str(play)]
                add("ansible_first", timed(lambda a=argv: run_peer(a, env, base)))
                add("ansible_noop", timed(lambda a=argv: run_peer(a, env, base)))
                check_root(aroot, ans_files)
            print(f"run {run_no + 1}/{runs} done", file=sys.stderr)

        med = {k: statistics.median(v) for k, v in samples.items()}
        count = {"agent_cli": n_files, "agent_daemon": n_files, "baseline": n_files, "pyinfra": n_files,
                 "ansible": n_ansible}
        per_file = {f"{tool}_{phase}": med[f"{tool}_{phase}"] / n for tool, n in count.items()
                    for phase in ("first", "noop")}
        ratios = {
            # how many times faster per file the one-shot agent is than each peer
            "ansible_vs_agent_noop": per_file["ansible_noop"] / per_file["agent_cli_noop"],
            "ansible_vs_agent_first": per_file["ansible_first"] / per_file["agent_cli_first"],
            "pyinfra_vs_agent_noop": per_file["pyinfra_noop"] / per_file["agent_cli_noop"],
            "pyinfra_vs_agent_first": per_file["pyinfra_first"] / per_file["agent_cli_first"],
            # how many times slower than the floor the daemon's sync is
            "agent_daemon_vs_baseline_first": med["agent_daemon_first"] / med["baseline_first"],
            "agent_daemon_vs_baseline_noop": med["agent_daemon_noop"] / med["baseline_noop"],
        }
        return {"files": n_files, "ansible_files": n_ansible, "runs": runs, "ansible_runs": ansible_runs,
                "peers": peer_versions(), "median_seconds": med, "per_file_seconds": per_file,
                "ratios": ratios, "samples": samples}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def print_table(r: dict[str, Any]) -> None:
    """Print the figures of :func:`run` as a Markdown table."""
    med, pf = r["median_seconds"], r["per_file_seconds"]
    print(f"# reconcile: {r['files']} files (Ansible {r['ansible_files']}), median of {r['runs']} runs "
          f"(Ansible {r['ansible_runs']}); peers {r['peers']}")
    print("| tool | files | first apply | per file | no-op | per file |")
    print("|---|---|---|---|---|---|")
    rows = (("edge-agent sync --once", "agent_cli", r["files"]), ("agent sync, warm (daemon)", "agent_daemon",
            r["files"]), ("baseline (hash + atomic write)", "baseline", r["files"]),
            ("pyinfra @local files.put", "pyinfra", r["files"]),
            ("ansible-playbook -c local copy", "ansible", r["ansible_files"]))
    for label, key, n in rows:
        print(f"| {label} | {n} | {med[key + '_first'] * 1000:.0f} ms | {pf[key + '_first'] * 1000:.3f} ms "
              f"| {med[key + '_noop'] * 1000:.0f} ms | {pf[key + '_noop'] * 1000:.3f} ms |")
    print(f"interpreter start-up (python -c pass): {med['python_start'] * 1000:.0f} ms")
    for name, value in r["ratios"].items():
        print(f"{name}: {value:.1f}x")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, or JSON with ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--ansible-files", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ansible-runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    result = run(args.files, min(args.ansible_files, args.files), args.runs, min(args.ansible_runs, args.runs))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
