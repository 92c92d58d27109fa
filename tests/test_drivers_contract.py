"""The contract every driver keeps, checked for each kind on real files and the stand-in tools.

For each kind: on a fresh device observe+plan gives changes; applying them converges (a second
plan is empty); snapshot+undo of everything applied restores the device exactly; prune of a
resource the agent created removes it, and prune of one whose path existed before restores it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from edge_agent.drivers import REGISTRY, Change, Context, Driver, get_driver
from edge_agent.drivers.secret_file import expected_secret_id
from edge_agent.state import Managed
from edge_core.resources import (
    Absent,
    CommandRes,
    Directory,
    File,
    Resource,
    SecretFile,
    Symlink,
    Sysctl,
    SystemdUnit,
)
from edge_core.trust.sealed import open_sealed, seal
from tests.support.fake_system import FakeSystem, make_context, tree_state

DEVICE_KEY = PrivateKey.generate()
UNIT_TEXT = b"[Unit]\nDescription=app\n[Service]\nExecStart=/usr/bin/app\n"


def _opener(res: SecretFile, document: bytes) -> bytes:
    return open_sealed(document, expected_id=expected_secret_id(res), key=DEVICE_KEY)


@dataclass
class Case:
    """One resource kind under the contract."""

    name: str
    resource: Resource
    payload: bytes | None
    fresh: Callable[[Path, FakeSystem], None]
    existing: Callable[[Path, FakeSystem], None] | None = None
    undoable: bool = True
    prunes: bool = True


def _mk(root: Path, *dirs: str) -> None:
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)


def _file_existing(root: Path, fake: FakeSystem) -> None:
    _mk(root, "etc")
    (root / "etc/motd").write_text("old motd\n")
    (root / "etc/motd").chmod(0o644)


def _dir_existing(root: Path, fake: FakeSystem) -> None:
    _mk(root, "opt/data")
    (root / "opt/data").chmod(0o700)
    (root / "opt/data/keep.txt").write_text("keep")


def _symlink_existing(root: Path, fake: FakeSystem) -> None:
    _mk(root, "etc")
    (root / "etc/alt").symlink_to("/opt/old")


def _absent_fresh(root: Path, fake: FakeSystem) -> None:
    _mk(root, "var/junk/sub")
    (root / "var/junk/sub/a.txt").write_text("a")
    (root / "var/junk/sub/a.txt").chmod(0o600)
    (root / "var/junk/link").symlink_to("sub/a.txt")
    (root / "var/junk").chmod(0o750)


def _secret_existing(root: Path, fake: FakeSystem) -> None:
    _mk(root, "etc")
    (root / "etc/wifi.psk").write_text("old-psk")
    (root / "etc/wifi.psk").chmod(0o644)


def _unit_fresh(root: Path, fake: FakeSystem) -> None:
    _mk(root, "etc/systemd/system")
    fake.add_unit_dir(root / "etc/systemd/system")


def _unit_existing(root: Path, fake: FakeSystem) -> None:
    _unit_fresh(root, fake)
    (root / "etc/systemd/system/app.service").write_bytes(b"[Service]\nExecStart=/usr/bin/old\n")
    fake.set_unit("app.service", enabled="enabled", active="active")


def _sysctl_fresh(root: Path, fake: FakeSystem) -> None:
    _mk(root, "etc/sysctl.d")
    fake.set_sysctl("net.ipv4.ip_forward", "0")


def _command_fresh(root: Path, fake: FakeSystem) -> None:
    _mk(root, "var")


CASES = [
    Case("file", File(id="file:/etc/motd", bundle="b", path="/etc/motd", mode=0o640, content="hello\n"),
         b"hello\n", lambda r, f: _mk(r, "etc"), _file_existing),
    Case("directory", Directory(id="directory:/opt/data", bundle="b", path="/opt/data", mode=0o750),
         None, lambda r, f: _mk(r, "opt"), _dir_existing),
    Case("symlink", Symlink(id="symlink:/etc/alt", bundle="b", path="/etc/alt", target="/opt/new"),
         None, lambda r, f: _mk(r, "etc"), _symlink_existing),
    Case("absent", Absent(id="absent:/var/junk", bundle="b", path="/var/junk"), None, _absent_fresh,
         prunes=False),
    Case("secret_file", SecretFile(id="secret_file:/etc/wifi.psk", bundle="b", path="/etc/wifi.psk",
                                   secret="secrets/wifi-psk.sealed.json"),
         seal(b"s3cret-psk-value", secret_id="wifi-psk", version=1, recipients=[DEVICE_KEY.public_key]),
         lambda r, f: _mk(r, "etc"), _secret_existing),
    Case("systemd_unit", SystemdUnit(id="systemd_unit:app.service", bundle="b", name="app.service",
                                     content=UNIT_TEXT.decode(), enabled=True, running=True),
         UNIT_TEXT, _unit_fresh, _unit_existing),
    Case("sysctl", Sysctl(id="sysctl:net.ipv4.ip_forward", bundle="b", name="net.ipv4.ip_forward", value="1"),
         None, _sysctl_fresh),
    Case("command", CommandRes(id="command:init", bundle="b", name="init", creates="/var/done",
                               run='echo ran >> "$EDGE_FLEET_ROOT/var/runs"; '
                                   'touch "$EDGE_FLEET_ROOT/var/done"'),
         None, _command_fresh, undoable=False, prunes=False),
]


def test_every_registered_kind_has_a_contract_case() -> None:
    assert {c.name for c in CASES} == set(REGISTRY)
    for kind, driver in REGISTRY.items():
        assert driver.kind == kind


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    return FakeSystem.install(tmp_path, monkeypatch)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "device"
    r.mkdir()
    return r


def _ctx(root: Path, case: Case) -> Context:
    payloads = {case.resource.id: case.payload} if case.payload is not None else {}
    return make_context(root, payloads, open_secret=_opener)


@pytest.fixture
def contexts() -> Iterator[list[Context]]:
    made: list[Context] = []
    yield made
    for ctx in made:
        ctx.fs.close()


def fingerprint(root: Path, fake: FakeSystem) -> dict[str, Any]:
    st = fake.state()
    units = {n: u for n, u in st["units"].items() if (u["enabled"], u["active"]) != ("disabled", "inactive")}
    return {"tree": tree_state(root), "units": units, "sysctl": st["sysctl"]}


def plan_of(res: Resource, ctx: Context) -> list[Change]:
    driver = get_driver(res.kind)
    return driver.plan(res, driver.observe(res, ctx), ctx)


Journal = list[tuple[Driver, list[dict[str, Any]]]]


def apply_journaled(changes: list[Change], ctx: Context) -> Journal:
    journal: Journal = []
    for change in changes:
        driver = get_driver(change.kind)
        records = driver.snapshot(change, ctx)
        journal.append((driver, records))
        driver.apply(change, ctx)
    return journal


def undo_all(journal: Journal, ctx: Context) -> None:
    for driver, records in reversed(journal):
        for record in reversed(records):
            driver.undo(record, ctx)


def managed_after(res: Resource, journal: Journal, ctx: Context) -> Managed:
    driver = get_driver(res.kind)
    spec, digest = driver.spec_of(res, ctx)
    original = driver.original_of(res, journal[0][1]) if journal else None
    return Managed(res.id, res.kind, spec, digest, original, 0.0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fresh_device_plans_changes_and_converges(case: Case, root: Path, fake: FakeSystem,
                                                  contexts: list[Context]) -> None:
    case.fresh(root, fake)
    ctx = _ctx(root, case)
    contexts.append(ctx)
    changes = plan_of(case.resource, ctx)
    assert changes
    assert all(c.resource_id == case.resource.id and c.kind == case.name for c in changes)
    apply_journaled(changes, ctx)
    assert plan_of(case.resource, ctx) == []


def _starts(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, s, id=f"{c.name}-{s}") for c in cases for s in ("fresh", "existing")
            if getattr(c, s) is not None]


def _setup(case: Case, start: str) -> Callable[[Path, FakeSystem], None]:
    setup = case.fresh if start == "fresh" else case.existing
    assert setup is not None
    return setup


@pytest.mark.parametrize(("case", "start"), _starts([c for c in CASES if c.undoable]))
def test_snapshot_and_undo_restore_exactly(case: Case, start: str, root: Path, fake: FakeSystem,
                                           contexts: list[Context]) -> None:
    _setup(case, start)(root, fake)
    ctx = _ctx(root, case)
    contexts.append(ctx)
    before = fingerprint(root, fake)
    changes = plan_of(case.resource, ctx)
    assert changes
    journal = apply_journaled(changes, ctx)
    assert fingerprint(root, fake) != before
    undo_all(journal, ctx)
    assert fingerprint(root, fake) == before
    undo_all(journal, ctx)  # undo is idempotent
    assert fingerprint(root, fake) == before


@pytest.mark.parametrize(("case", "start"), _starts(CASES))
def test_prune_gives_the_path_back(case: Case, start: str, root: Path, fake: FakeSystem,
                                   contexts: list[Context]) -> None:
    _setup(case, start)(root, fake)
    ctx = _ctx(root, case)
    contexts.append(ctx)
    before = fingerprint(root, fake)
    journal = apply_journaled(plan_of(case.resource, ctx), ctx)
    managed = managed_after(case.resource, journal, ctx)
    driver = get_driver(case.name)
    prune = driver.prune(managed, ctx)
    if not case.prunes:
        assert prune == []
        return
    assert prune
    apply_journaled(prune, ctx)
    assert fingerprint(root, fake) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_changes_are_json_able(case: Case, root: Path, fake: FakeSystem, contexts: list[Context]) -> None:
    case.fresh(root, fake)
    ctx = _ctx(root, case)
    contexts.append(ctx)
    for change in plan_of(case.resource, ctx):
        json.dumps(dict(change.data))
        assert change.summary
        assert "\n" not in change.summary
        for p in change.paths:
            assert p.startswith("/")
    spec, digest = get_driver(case.name).spec_of(case.resource, ctx)
    json.dumps(spec)
    assert len(digest) == 64


def test_fake_tools_are_first_on_path(fake: FakeSystem) -> None:
    assert os.environ["PATH"].split(os.pathsep)[0] == str(fake.bin_dir)
