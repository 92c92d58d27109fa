"""Optimised byte code (``python -OO``) for the standard-library modules the agent loads.

The packaged agent runs under ``python -OO``: no docstrings and no ``assert`` statements in memory
(docs/packaging.md). Its own virtual environment ships ``opt-2`` byte code, but the interpreter's
standard library comes from the distribution with plain byte code only; without ``opt-2`` files
next to it, every start would compile those modules from source in memory (``edge-agent sync
--once`` peaks 4.6-4.9 MiB higher that way in three runs of ``bench.bench_footprint``,
docs/benchmarks.md).

``python -m edge_agent.bytecode`` imports every module of the agent and of ``edge_core`` (the
network clients included), writes ``opt-2`` byte code for each standard-library module that brought
in, and prints how many. ``--remove`` deletes the same files again. The package runs it from its
maintainer scripts: on install and upgrade, when the interpreter package changes (a dpkg trigger on
the standard library's directory), and before removal.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import pkgutil
import py_compile
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["agent_modules", "compile_optimised", "main", "optimised_path", "remove_optimised",
           "stdlib_sources"]

OPTIMIZE = 2
"""The level the package's commands run at (``-OO``)."""

_ROOTS = ("edge_core", "edge_agent")


def agent_modules() -> list[str]:
    """The names of every module of ``edge_core`` and ``edge_agent``, packages first."""
    names: list[str] = []
    for root in _ROOTS:
        pkg = importlib.import_module(root)
        names.append(root)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, root + ".")]
    return names


def stdlib_sources(modules: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Import ``modules``; return the standard library's source files now loaded, sorted, and the
    modules that could not be imported (each with its reason)."""
    failed: list[str] = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - one module that cannot load must not stop the rest
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    found: set[Path] = set()
    for mod in list(sys.modules.values()):
        origin = getattr(mod, "__file__", None)
        if isinstance(origin, str) and origin.endswith(".py"):
            path = Path(origin).resolve()
            if path.is_relative_to(stdlib) and "site-packages" not in path.parts:
                found.add(path)
    return sorted(found), failed


def optimised_path(source: Path) -> Path:
    """Where the interpreter looks for ``source``'s byte code under ``-OO``."""
    return Path(importlib.util.cache_from_source(str(source), optimization=OPTIMIZE))


def compile_optimised(sources: Iterable[Path]) -> tuple[int, list[str]]:
    """Write ``opt-2`` byte code for each of ``sources``; return how many were written and the
    failures (each ``path: reason``)."""
    written = 0
    failures: list[str] = []
    for source in sources:
        try:
            py_compile.compile(str(source), cfile=str(optimised_path(source)), doraise=True,
                               optimize=OPTIMIZE)
            written += 1
        except (OSError, py_compile.PyCompileError) as exc:
            failures.append(f"{source}: {exc}")
    return written, failures


def remove_optimised(sources: Iterable[Path]) -> int:
    """Delete the ``opt-2`` byte code of each of ``sources``; return how many files were removed."""
    removed = 0
    for source in sources:
        with contextlib.suppress(FileNotFoundError):
            optimised_path(source).unlink()
            removed += 1
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write (or with ``--remove`` delete) the standard library's ``opt-2`` byte code
    for the modules the agent loads; exit 1 when any file could not be written."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent.bytecode",
                                     description="Optimised byte code for the standard-library modules "
                                                 "the agent loads.")
    parser.add_argument("--remove", action="store_true", help="delete it instead of writing it")
    args = parser.parse_args(argv)
    sys.dont_write_bytecode = True  # the imports below must not write byte code of their own
    sources, failed = stdlib_sources(agent_modules())
    for line in failed:
        sys.stderr.write(f"edge-agent: cannot import {line}\n")
    if args.remove:
        removed = remove_optimised(sources)
        sys.stdout.write(f"edge-agent: removed optimised byte code of {removed} standard-library modules\n")
        return 0
    written, failures = compile_optimised(sources)
    for line in failures:
        sys.stderr.write(f"edge-agent: cannot byte-compile {line}\n")
    sys.stdout.write(f"edge-agent: optimised byte code for {written} standard-library modules\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
