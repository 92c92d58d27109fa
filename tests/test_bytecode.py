"""``edge_agent.bytecode``: the standard library's optimised byte code the packaged agent runs with.

The whole command runs for real in the Debian-root install test (postinst, the dpkg trigger, prerm);
here its parts, on files of a temporary directory.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from edge_agent.bytecode import (
    agent_modules,
    compile_optimised,
    optimised_path,
    remove_optimised,
    stdlib_sources,
)

SOURCE = '"""DOCSTRING-MARK"""\n\n\ndef f() -> None:\n    assert False, "ASSERT-MARK"\n'


def test_compile_writes_opt2_byte_code_without_docstrings_or_asserts(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(SOURCE)
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    written, failures = compile_optimised([broken, good])
    assert written == 1
    assert len(failures) == 1
    assert failures[0].startswith(f"{broken}: ")
    pyc = optimised_path(good)
    assert pyc == tmp_path / "__pycache__" / f"good.{sys.implementation.cache_tag}.opt-2.pyc"
    data = pyc.read_bytes()
    assert b"DOCSTRING-MARK" not in data
    assert b"ASSERT-MARK" not in data
    assert not (tmp_path / "__pycache__" / f"good.{sys.implementation.cache_tag}.pyc").exists()
    assert remove_optimised([good, broken]) == 1
    assert not pyc.exists()
    assert remove_optimised([good]) == 0


def test_stdlib_sources_are_the_standard_library_files_loaded_and_nothing_else() -> None:
    sources, failed = stdlib_sources(["json", "edge_core.durations", "edge_agent.no_such_module"])
    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    assert stdlib / "json" / "__init__.py" in sources
    assert all(p.is_relative_to(stdlib) and "site-packages" not in p.parts for p in sources)
    assert sources == sorted(set(sources))
    assert len(failed) == 1
    assert failed[0].startswith("edge_agent.no_such_module: ModuleNotFoundError")


def test_agent_modules_cover_both_packages_and_the_network_clients() -> None:
    names = agent_modules()
    assert names[0] == "edge_core"
    assert "edge_agent" in names
    for name in ("edge_agent.daemon", "edge_agent.cli", "edge_core.gitclients", "edge_agent.drivers.file"):
        assert name in names
    assert not any(n.startswith("fleet_server") for n in names)
