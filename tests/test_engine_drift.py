"""Drift: hand edits of managed resources are found, described briefly, and never leak secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from edge_agent.drivers.base import Context
from edge_agent.drivers.secret_file import expected_secret_id
from edge_agent.engine.drift import detect_drift
from edge_agent.engine.plan import make_plan
from edge_agent.engine.transaction import apply_plan
from edge_agent.state import StateDB
from edge_core.release import DesiredState
from edge_core.resources import CommandRes, Directory, SecretFile
from edge_core.trust.sealed import open_sealed, seal
from tests.support.fake_system import make_context
from tests.support.plans import ctx_for, desired_state, file_res

SECRET = b"correct horse battery staple\n"
HAND_SECRET = b"typed in by hand on site\n"


@pytest.fixture
def setup(tmp_path: Path, state: StateDB) -> tuple[DesiredState, Context, Path]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    key = PrivateKey.generate()

    def opener(res: SecretFile, doc: bytes) -> bytes:
        return open_sealed(doc, expected_id=expected_secret_id(res), key=key)

    secret = SecretFile(id="secret:api", bundle="app", path="/etc/app/api.key", mode=0o600,
                        secret="secrets/api-key.sealed.json")
    payloads = {secret.id: seal(SECRET, secret_id="api-key", version=1, recipients=[key.public_key])}
    desired = desired_state([
        Directory(id="d:app", bundle="app", path="/etc/app", mode=0o755),
        file_res("/etc/app/app.conf", b"listen 80\n", payloads),
        secret,
        CommandRes(id="cmd:always", bundle="app", name="always", run=("true",)),
    ], payloads)
    ctx = make_context(root, desired.payloads, allowed_roots=("/etc",), open_secret=opener)
    out = apply_plan(make_plan(desired, {}, ctx), desired, ctx, state, txn_id="t1", version=1, commit="c1",
                     run_checks=list)
    assert out.status == "applied", out
    return desired, ctx, root


def test_no_drift_right_after_apply(setup: tuple[DesiredState, Context, Path], state: StateDB) -> None:
    desired, ctx, _root = setup
    assert detect_drift(desired, state.managed(), ctx) == []


def test_hand_edited_file_is_reported_with_expected_and_found(
    setup: tuple[DesiredState, Context, Path], state: StateDB,
) -> None:
    desired, ctx, root = setup
    conf = root / "etc" / "app" / "app.conf"
    conf.write_bytes(b"listen 8080\n")
    os.chmod(conf, 0o666)
    findings = detect_drift(desired, state.managed(), ctx)
    assert [f.resource_id for f in findings] == ["file:/etc/app/app.conf"]
    finding = findings[0]
    assert finding.expected.startswith("sha256 ")
    assert "mode 0644" in finding.expected
    assert "mode 0666" in finding.found
    assert finding.expected.split()[1] != finding.found.split()[1]
    assert finding.actions == ("update",)
    # detection changed nothing
    assert conf.read_bytes() == b"listen 8080\n"


def test_mode_only_drift_and_removed_file(setup: tuple[DesiredState, Context, Path], state: StateDB) -> None:
    desired, ctx, root = setup
    os.chmod(root / "etc" / "app", 0o777)
    (root / "etc" / "app" / "app.conf").unlink()
    findings = {f.resource_id: f for f in detect_drift(desired, state.managed(), ctx)}
    assert set(findings) == {"d:app", "file:/etc/app/app.conf"}
    assert findings["file:/etc/app/app.conf"].found == "missing"
    assert "0777" in findings["d:app"].found


def test_secret_drift_never_shows_secret_content(
    setup: tuple[DesiredState, Context, Path], state: StateDB,
) -> None:
    desired, ctx, root = setup
    (root / "etc" / "app" / "api.key").write_bytes(HAND_SECRET)
    findings = detect_drift(desired, state.managed(), ctx)
    assert [f.resource_id for f in findings] == ["secret:api"]
    text = repr(findings)
    for secret in (SECRET, HAND_SECRET):
        assert secret.decode().strip() not in text
        assert secret.decode().split()[0] not in text
    assert "redacted" in findings[0].expected


def test_unmanaged_resources_and_commands_are_not_drift(
    setup: tuple[DesiredState, Context, Path], state: StateDB,
) -> None:
    desired, ctx, _root = setup
    payloads = dict(desired.payloads)
    extra = file_res("/etc/app/new.conf", b"new\n", payloads)
    grown = DesiredState(bundles=desired.bundles, resources=(*desired.resources, extra), checks=(),
                         payloads=payloads)
    # the command (no guards) would run on every sync, the new file was never applied: neither is drift
    assert detect_drift(grown, state.managed(), ctx_for(ctx, grown)) == []


def test_unobservable_resource_is_drift(setup: tuple[DesiredState, Context, Path], state: StateDB) -> None:
    desired, ctx, root = setup
    app = root / "etc" / "app"
    app.rename(root / "etc" / "app.moved")
    os.symlink("app.moved", app)
    findings = {f.resource_id: f for f in detect_drift(desired, state.managed(), ctx)}
    assert "file:/etc/app/app.conf" in findings
    assert "symlink" in findings["file:/etc/app/app.conf"].found
