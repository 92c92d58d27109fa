"""The import boundary of the three packages, read from the source (ast), every import included.

    edge_core     imports neither edge_agent nor fleet_server (the shared formats and checks)
    edge_agent    imports edge_core only (the device runtime); never fleet_server, never operator code
    fleet_server  imports edge_core only (the server and fleetctl); never the device runtime

and each third-party library with an adapter is imported only by its adapter module(s). Function-level
and ``TYPE_CHECKING`` imports count like any other; relative imports are resolved first.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_core", "edge_agent", "fleet_server")

# Which of our packages each package may import (its own always).
ALLOWED_PACKAGES: dict[str, frozenset[str]] = {
    "edge_core": frozenset({"edge_core"}),
    "edge_agent": frozenset({"edge_core", "edge_agent"}),
    "fleet_server": frozenset({"edge_core", "fleet_server"}),
}

# Operator-only code: building and signing releases, lint. Never on the device's import path.
OPERATOR_ONLY = ("fleet_server.authoring", "fleet_server.signing", "fleet_server.lint", "fleet_server.cli")

# Third-party library -> the files (repo-relative prefixes) allowed to import it, each with its reason.
ADAPTERS: dict[str, dict[str, str]] = {
    "paho": {
        "edge_agent/report/mqtt.py": "the device's broker link",
        "fleet_server/ingest.py": "the server's broker link (subscribe, publish assignments and nudges)",
    },
    "dulwich": {
        "edge_core/source.py": "the repository cache: refs, locks, reading trees",
        "edge_core/gitfetch.py": "one transfer into the cache and the reason of each way it fails",
        "edge_core/gittransport.py": "the credentials, failure reasons and pack spool of every transport",
        "edge_core/gitclients.py": "the dulwich client of each network transport, loaded on first use",
        "edge_core/githttp.py": "the smart-HTTP transport: dulwich's protocol over http.client",
    },
    "nacl": {
        "edge_core/trust/keys.py": "key types and text forms (re-exports the key types for everyone else)",
        "edge_core/trust/manifest.py": "Ed25519 signature checks of signed documents",
        "edge_core/trust/sealed.py": "sealed boxes and XChaCha20-Poly1305 of sealed secrets",
        "edge_core/trust/sshsig.py": "Ed25519 verification of SSH-signed commits",
    },
    "sqlite3": {
        "edge_agent/state": "the device's state database (state.py, or the modules it is split into)",
        "fleet_server/store": "the server's store (store.py, store_rollouts.py, or the store/ package)",
    },
    "sqlite_utils": {
        "fleet_server/store": "the server's store",
    },
    "psycopg": {
        "fleet_server/store": "the server's store (PostgreSQL backend)",
    },
    # no adapter: the agent reads its metrics from /proc, /sys and statvfs (edge_agent/telemetry.py),
    # and neither package ships psutil
    "psutil": {},
    # no adapter: the smart-HTTP client runs on http.client (edge_core/githttp.py); dulwich's own
    # urllib3 client would add 1.6-1.8 MiB to the agent
    "urllib3": {},
    "prometheus_client": {
        "fleet_server/metrics": "the server's collectors and exposition (metrics.py, metrics_*.py)",
    },
}

# (file, imported module) pairs allowed to cross the boundary for the length of one change that
# removes them; empty, and kept empty: a pair left here is a crossing nobody is removing.
PENDING: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Violation:
    """One forbidden import: where it is and why it is refused."""

    file: str
    line: int
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.module}: {self.rule}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as (line, absolute dotted name); ``from m import n`` gives
    ``m.n`` (it may name a submodule), relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
    return found


def _top(module: str) -> str:
    return module.partition(".")[0]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def check_file(root: Path, path: Path) -> list[Violation]:
    """Return every forbidden import of one module of the tree at ``root`` (one per line and rule)."""
    rel = path.relative_to(root).as_posix()
    own = rel.partition("/")[0]
    found: dict[tuple[int, str], Violation] = {}
    for line, module in imports_of(root, path):
        top = _top(module)
        if top in PACKAGES and top not in ALLOWED_PACKAGES[own]:
            if (rel, top) not in PENDING:
                allowed = ", ".join(sorted(ALLOWED_PACKAGES[own]))
                found.setdefault((line, top),
                                 Violation(rel, line, module, f"{own} may import only {allowed}"))
        elif own == "edge_agent" and any(_within(module, p) for p in OPERATOR_ONLY):
            found.setdefault((line, "operator"), Violation(
                rel, line, module, "operator-only code on the device's import path"))
        elif top in ADAPTERS and not any(rel.startswith(prefix) for prefix in ADAPTERS[top]):
            adapters = ", ".join(sorted(ADAPTERS[top]))
            why = f"{top} is imported only by its adapter: {adapters}" if adapters else \
                f"{top} is imported by no module of the packages"
            found.setdefault((line, top), Violation(rel, line, module, why))
    return list(found.values())


def check_tree(root: Path) -> list[Violation]:
    """Return every forbidden import of every module of the three packages under ``root``."""
    out: list[Violation] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            out.extend(check_file(root, path))
    return out


def test_the_tree_keeps_its_import_boundary() -> None:
    violations = check_tree(REPO)
    assert not violations, "forbidden imports:\n" + "\n".join(str(v) for v in violations)


def test_every_package_is_read() -> None:
    for package in PACKAGES:
        assert (REPO / package / "__init__.py").is_file()
        assert len(list((REPO / package).rglob("*.py"))) > 5


def test_every_adapter_exists_and_uses_its_library() -> None:
    for library, allowed in ADAPTERS.items():
        for prefix in allowed:
            if library == "psycopg":
                continue  # the PostgreSQL backend is still to land
            assert list(REPO.glob(prefix + "*")), f"adapter {prefix} of {library} does not exist"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("rel", "text", "line", "needle"), [
    ("edge_core/x.py", "import os\nfrom edge_agent.state import StateDB\n", 2, "edge_core may import only"),
    ("edge_core/x.py", "def f():\n    import fleet_server.store\n", 2, "edge_core may import only"),
    ("edge_core/trust/x.py", "from ...fleet_server import lint\n", 1, "edge_core may import only"),
    ("edge_agent/x.py", "from fleet_server.errors import ServerError\n", 1, "edge_agent may import only"),
    ("fleet_server/x.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import edge_agent.state\n",
     3, "fleet_server may import only"),
    ("fleet_server/api/x.py", "from edge_agent import telemetry\n", 1, "fleet_server may import only"),
    ("edge_agent/x.py", "import paho.mqtt.client as mqtt\n", 1, "paho is imported only by its adapter"),
    ("fleet_server/x.py", "from dulwich.repo import Repo\n", 1, "dulwich is imported only by its adapter"),
    ("edge_agent/x.py", "from nacl.signing import SigningKey\n", 1, "nacl is imported only by its adapter"),
    ("fleet_server/api/x.py", "import sqlite3\n", 1, "sqlite3 is imported only by its adapter"),
    ("edge_agent/drivers/x.py", "def f():\n    import psutil\n", 2, "psutil is imported by no module"),
    ("fleet_server/x.py", "from prometheus_client import Counter\n", 1, "prometheus_client is imported only"),
])
def test_the_checker_names_file_and_line_of_a_planted_bad_import(tmp_path: Path, rel: str, text: str,
                                                                  line: int, needle: str) -> None:
    root = _tree(tmp_path, {rel: text})
    violations = check_tree(root)
    assert len(violations) == 1, violations
    assert str(violations[0]).startswith(f"{rel}:{line}: imports ")
    assert needle in str(violations[0])


def test_the_checker_refuses_operator_code_on_the_device_even_if_the_package_were_allowed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALLOWED_PACKAGES, "edge_agent",
                        frozenset({"edge_core", "edge_agent", "fleet_server"}))
    root = _tree(tmp_path, {"edge_agent/x.py": "from fleet_server.authoring.manifest import sign_document\n"})
    assert [str(v) for v in check_tree(root)] == [
        "edge_agent/x.py:1: imports fleet_server.authoring.manifest: operator-only code on the device's "
        "import path"]


def test_the_checker_accepts_allowed_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "edge_core/source.py": "from dulwich.repo import Repo\nfrom edge_core.errors import FetchError\n",
        "edge_agent/report/mqtt.py": "import paho.mqtt.client\n",
        "edge_agent/agent.py": "from edge_core.trust.verify import verify_tree\nfrom . import state\n",
        "edge_agent/state.py": "import sqlite3\n",
        "fleet_server/store/sql.py": "import sqlite3\nimport sqlite_utils\n",
        "fleet_server/releases.py":
            "from edge_core.source import Source\nfrom .metrics import ReleaseMetrics\n",
    })
    assert check_tree(root) == []


def test_pending_pairs_are_skipped_and_only_those(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(globals(), "PENDING", frozenset({("fleet_server/ingest.py", "edge_agent")}))
    root = _tree(tmp_path, {
        "fleet_server/ingest.py": "from edge_agent.errors import LockedError\n",
        "fleet_server/baseline.py": "from edge_agent.errors import LockedError\n",
    })
    assert [v.file for v in check_tree(root)] == ["fleet_server/baseline.py"]
