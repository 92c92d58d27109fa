"""No test module imports from another test module: shared helpers live in ``tests/support/``."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    """True when ``dotted`` names a module under ``tests`` whose file name starts with ``test_``."""
    parts = dotted.split(".")
    return parts[0] == "tests" and any(part.startswith("test_") for part in parts[1:])


def imports_of_test_modules(source: str, package: str) -> list[str]:
    """The modules named ``tests....test_*`` that ``source`` (a module of ``package``) imports."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if _is_test_module(target):
                found.append(target)
            else:
                found += [f"{target}.{alias.name}" for alias in node.names
                          if _is_test_module(f"{target}.{alias.name}")]
    return found


def test_the_check_sees_every_form_of_import() -> None:
    assert imports_of_test_modules("from tests.test_api import serve_app\n", "tests") == ["tests.test_api"]
    assert imports_of_test_modules("import tests.reliability.test_power_loss\n", "tests") == [
        "tests.reliability.test_power_loss"]
    assert imports_of_test_modules("from tests import test_agent_e2e\n", "tests") == ["tests.test_agent_e2e"]
    assert imports_of_test_modules("from .test_broker_outage import SimDevice\n", "tests.reliability") == [
        "tests.reliability.test_broker_outage"]
    assert imports_of_test_modules("from tests.support.api_server import serve_app\n", "tests") == []


def test_no_test_module_imports_another_test_module() -> None:
    offenders: list[str] = []
    for path in sorted(TESTS.rglob("*.py")):
        if ".venv" in path.parts:
            continue
        rel = path.relative_to(TESTS.parent)
        package = ".".join(rel.parent.parts)
        for target in imports_of_test_modules(path.read_text(encoding="utf-8"), package):
            offenders.append(f"{rel} imports {target}")
    assert not offenders, "move the shared helper to tests/support/: " + "; ".join(offenders)
