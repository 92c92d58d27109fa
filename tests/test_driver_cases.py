"""The driver case tables in ``tests/drivers/<kind>/*.yaml``: each case plans one resource.

Each case sets up the observed state on a tmp device root (and in the stand-in ``systemctl`` and
``sysctl``), calls the planner directly and compares the planned actions with the expected ones.
The format is described in ``tests/drivers/README.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from nacl.public import PrivateKey

from edge_agent.drivers.secret_file import expected_secret_id
from edge_agent.engine.plan import make_plan
from edge_core.resources import SecretFile, parse_resource
from edge_core.trust.sealed import open_sealed, seal
from tests.support.fake_system import FakeSystem, make_context
from tests.support.plans import desired_state

CASES_DIR = Path(__file__).resolve().parent / "drivers"
CASE_KEYS = frozenset({"description", "resource", "secret_plaintext", "observed", "expected"})
OBSERVED_KEYS = frozenset({"dirs", "files", "links", "unit_dirs", "units", "sysctl"})
FILE_ISH = ("file", "directory", "symlink", "absent", "secret_file")


def case_files() -> list[Path]:
    """Every case file, sorted, so the test ids are stable."""
    return sorted(CASES_DIR.glob("*/*.yaml"))


def load_case(path: Path) -> dict[str, Any]:
    """Read one case and check its shape (a typo in a key must not make a case that cannot fail)."""
    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(case, dict), f"{path}: a case is a mapping"
    assert set(case) <= CASE_KEYS, f"{path}: unknown keys {sorted(set(case) - CASE_KEYS)}"
    assert {"description", "resource", "expected"} <= set(case), f"{path}: missing keys"
    assert set(case.get("observed") or {}) <= OBSERVED_KEYS, f"{path}: unknown observed keys"
    assert case["resource"]["kind"] == path.parent.name, f"{path}: kind must match its folder"
    assert isinstance(case["expected"], list), f"{path}: expected is a list of actions"
    return case


def set_up(root: Path, fake: FakeSystem, observed: dict[str, Any]) -> None:
    """Make the device root and the stand-in tools look as ``observed`` says."""
    def host(device_path: str) -> Path:
        return root / device_path.lstrip("/")

    for path, mode in (observed.get("dirs") or {}).items():
        host(path).mkdir(parents=True, exist_ok=True)
        host(path).chmod(int(str(mode), 8))
    for path, spec in (observed.get("files") or {}).items():
        host(path).parent.mkdir(parents=True, exist_ok=True)
        host(path).write_text(spec["content"], encoding="utf-8")
        host(path).chmod(int(str(spec.get("mode", "0644")), 8))
    for path, target in (observed.get("links") or {}).items():
        host(path).parent.mkdir(parents=True, exist_ok=True)
        host(path).symlink_to(target)
    for path in observed.get("unit_dirs") or []:
        host(path).mkdir(parents=True, exist_ok=True)
        fake.add_unit_dir(host(path))
    for name, words in (observed.get("units") or {}).items():
        fake.set_unit(name, enabled=words.get("enabled", "disabled"), active=words.get("active", "inactive"))
    for name, value in (observed.get("sysctl") or {}).items():
        fake.set_sysctl(name, str(value))


def test_every_file_ish_kind_has_at_least_three_cases() -> None:
    counts = {kind: len(list((CASES_DIR / kind).glob("*.yaml"))) for kind in FILE_ISH}
    assert all(n >= 3 for n in counts.values()), counts
    assert list((CASES_DIR / "systemd_unit").glob("*.yaml"))
    assert list((CASES_DIR / "sysctl").glob("*.yaml"))


@pytest.mark.parametrize("path", case_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_driver_case(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = load_case(path)
    fake = FakeSystem.install(tmp_path, monkeypatch)
    root = tmp_path / "root"
    root.mkdir()
    set_up(root, fake, case.get("observed") or {})
    res = parse_resource(case["resource"], "b")
    device_key = PrivateKey.generate()
    payloads: dict[str, bytes] = {}
    if isinstance(res, SecretFile):
        payloads[res.id] = seal(case["secret_plaintext"].encode(), secret_id=expected_secret_id(res),
                                version=1, recipients=[device_key.public_key])
    elif getattr(res, "content", None) is not None:
        payloads[res.id] = str(getattr(res, "content")).encode()

    def opener(secret: SecretFile, document: bytes) -> bytes:
        return open_sealed(document, expected_id=expected_secret_id(secret), key=device_key)

    ctx = make_context(root, payloads, open_secret=opener)
    try:
        plan = make_plan(desired_state([res], payloads), {}, ctx)
    finally:
        ctx.fs.close()
    assert not plan.unavailable, plan.unavailable
    assert [c.action for c in plan.changes] == case["expected"], case["description"]
