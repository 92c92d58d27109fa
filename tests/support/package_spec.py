"""What ``packaging/build_deb.py`` says the packages are, for the tests and the benchmarks that run
the agent as its package does: the builder loaded as a module, and the agent package's entry."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PACKAGING", "agent_dropped_extensions", "agent_package", "load_builder"]

PACKAGING = Path(__file__).resolve().parent.parent.parent / "packaging"


@functools.cache
def load_builder() -> ModuleType:
    """``packaging/build_deb.py`` as a module (loaded once a process).

    Raises:
        ImportError: the file cannot be loaded.
    """
    spec = importlib.util.spec_from_file_location("build_deb", PACKAGING / "build_deb.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {PACKAGING / 'build_deb.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_deb"] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def agent_package() -> Any:
    """The ``edge-agent`` entry of the builder's ``PACKAGES`` (a ``PackageSpec``)."""
    return load_builder().PACKAGES["edge-agent"]


def agent_dropped_extensions() -> tuple[str, ...]:
    """The compiled modules the agent package leaves out of its venv (dotted names)."""
    return tuple(agent_package().drop_extensions)
