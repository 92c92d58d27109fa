"""End-to-end syncs of the agent: a real signed repo pushed to a real `git daemon`, a tmp device root.

The shared world (``AgentFleet``, ``snapshot``, the ``fleet`` fixture) is in ``tests/support/agent_fleet.py``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nacl.signing import SigningKey

from edge_agent.agent import apply_lock, check_drift, pause, plan_only, resume, status, sync_once
from edge_agent.errors import LockedError
from edge_agent.identity import init_identity
from edge_core.trust.keys import format_verify_key
from fleet_server.signing import rotate_root
from tests.support.agent_fleet import AgentFleet, base_release, bundle, snapshot
from tests.support.fake_system import FakeSystem


def test_first_sync_applies_and_second_is_noop(fleet: AgentFleet) -> None:
    (fleet.root / "etc" / "app").mkdir()
    (fleet.root / "etc" / "app" / "legacy.conf").write_text("old\n")
    sha = fleet.publish(base_release(fleet.root))
    result = sync_once(fleet.config)
    assert result.outcome == "applied", result
    assert (result.version, result.commit) == (1, sha)
    assert result.changes > 0
    root = fleet.root
    assert (root / "etc/app/app.conf").read_text() == "listen = 8443\nupstream = one\n"
    assert stat.S_IMODE((root / "etc/app/app.conf").stat().st_mode) == 0o640
    assert (root / "etc/motd").read_text() == "managed by edge-fleet\n"
    assert stat.S_IMODE((root / "opt/app/data").stat().st_mode) == 0o750
    assert os.readlink(root / "opt/app/current") == "/opt/app/releases/1.0"
    assert not (root / "etc/app/legacy.conf").exists()
    assert (root / "srv/marker").exists()
    before = snapshot(root)
    again = sync_once(fleet.config)
    assert again.outcome == "noop", again
    assert again.changes == 0
    assert snapshot(root) == before
    info = status(fleet.config)
    assert info["installed"]["version"] == 1
    assert info["installed"]["commit"] == sha
    assert info["managed"] >= 6
    assert info["open_transaction"] is None
    events = [p for t, p in fleet.outbox() if t == "fleet/v1/dev-1/events"]
    assert any(b'"type":"sync_succeeded"' in p for p in events)


def test_tampered_release_is_refused_and_the_device_untouched(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    fleet.push_unsigned({"bundles/app/files/app.conf": "listen = 1\nupstream = evil\n"})
    result = sync_once(fleet.config)
    assert result.outcome == "refused"
    assert "app.conf" in (result.reason or "")
    assert snapshot(fleet.root) == before
    assert status(fleet.config)["installed"]["version"] == 1
    assert any(b'"type":"sync_refused"' in p for _, p in fleet.outbox())


def test_unsigned_new_file_and_expired_release_are_refused(fleet: AgentFleet) -> None:
    old = datetime.now(UTC) - timedelta(days=3)
    fleet.publish(base_release(fleet.root), expires=timedelta(days=1), now=old)
    empty = snapshot(fleet.root)
    result = sync_once(fleet.config)
    assert result.outcome == "refused"
    assert "expire" in (result.reason or "").lower()
    assert snapshot(fleet.root) == empty
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    fleet.push_unsigned({"bundles/app/files/extra.conf": "sneaked in\n"})
    result = sync_once(fleet.config)
    assert result.outcome == "refused"
    assert "extra.conf" in (result.reason or "")
    assert snapshot(fleet.root) == before


def test_rollback_below_the_floor_is_refused_but_above_it_allowed(fleet: AgentFleet) -> None:
    files = base_release(fleet.root)
    v1 = fleet.publish(files, floor=1)
    assert sync_once(fleet.config).outcome == "applied"
    v2 = fleet.publish({"bundles/app/files/app.conf": "listen = 8443\nupstream = two\n"}, floor=1)
    assert sync_once(fleet.config).outcome == "applied"
    # Going back to v1 (at the floor) is how a bad canary is undone: allowed.
    back = sync_once(fleet.config, want=v1)
    assert back.outcome == "applied", back
    assert (fleet.root / "etc/app/app.conf").read_text().endswith("upstream = one\n")
    fleet.publish({"bundles/app/files/app.conf": "listen = 8443\nupstream = three\n"}, floor=3)
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    for old in (v1, v2):
        refused = sync_once(fleet.config, want=old)
        assert refused.outcome == "refused", refused
        assert "floor" in (refused.reason or "").lower() or "rollback" in (refused.reason or "").lower()
    assert snapshot(fleet.root) == before
    assert status(fleet.config)["floor"] == 3


def test_mirror_down_keeps_the_last_release(fleet: AgentFleet, caplog: pytest.LogCaptureFixture) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    fleet.daemon.stop()
    with caplog.at_level("INFO", logger="edge_agent"):
        result = sync_once(fleet.config)
    assert result.outcome == "fetch_failed"
    assert result.reason
    # Nothing was fetched: the log says so instead of "release None commit None".
    assert "sync fetch_failed: no release changes 0" in caplog.text
    assert "None" not in caplog.text
    assert snapshot(fleet.root) == before
    assert status(fleet.config)["installed"]["version"] == 1
    # Drift checks keep working offline from the local cache.
    (fleet.root / "etc/motd").write_text("hacked\n")
    report = check_drift(fleet.config)
    assert report.corrected
    assert (fleet.root / "etc/motd").read_text() == "managed by edge-fleet\n"


def test_failed_health_check_rolls_back_byte_for_byte(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    bad = base_release(fleet.root)
    bad["bundles/app/bundle.yaml"] = bundle([
        {"kind": "directory", "path": "/opt/app/data", "mode": "0700"},
        {"kind": "file", "id": "app-config", "path": "/etc/app/app.conf", "source": "files/app.conf",
         "mode": "0600"},
        {"kind": "file", "path": "/etc/motd", "content": "broken release\n"},
        {"kind": "file", "path": "/etc/new.conf", "content": "new\n"},
        {"kind": "symlink", "path": "/opt/app/current", "target": "/opt/app/releases/2.0"},
    ], health=[{"kind": "command", "name": "always-fails", "run": ["false"], "timeout": 5}])
    bad["bundles/app/files/app.conf"] = "listen = 9999\n"
    fleet.publish(bad)
    result = sync_once(fleet.config)
    assert result.outcome == "rolled_back", result
    assert result.step
    assert "always-fails" in result.step
    assert snapshot(fleet.root) == before
    assert status(fleet.config)["installed"]["version"] == 1


def test_prune_removes_what_the_agent_created_and_restores_originals(fleet: AgentFleet) -> None:
    (fleet.root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    os.chmod(fleet.root / "etc/hosts", 0o644)
    files = base_release(fleet.root)
    files["bundles/extra/bundle.yaml"] = bundle([
        {"kind": "file", "path": "/etc/hosts", "content": "10.0.0.1 gateway\n"},
        {"kind": "file", "path": "/etc/extra.conf", "content": "extra\n"},
    ])
    fleet.publish(files)
    assert sync_once(fleet.config).outcome == "applied"
    assert (fleet.root / "etc/hosts").read_text() == "10.0.0.1 gateway\n"
    assert (fleet.root / "etc/extra.conf").exists()
    fleet.publish({}, remove=("bundles/extra/bundle.yaml",))
    result = sync_once(fleet.config)
    assert result.outcome == "applied", result
    assert (fleet.root / "etc/hosts").read_text() == "127.0.0.1 localhost\n"
    assert not (fleet.root / "etc/extra.conf").exists()
    assert (fleet.root / "etc/motd").exists()


def test_drift_is_corrected_in_enforce_mode(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    assert check_drift(fleet.config).findings == ()
    (fleet.root / "etc/app/app.conf").write_text("tampered\n")
    os.chmod(fleet.root / "etc/motd", 0o666)
    report = check_drift(fleet.config)
    ids = {f.resource_id for f in report.findings}
    assert "app-config" in ids
    assert report.corrected
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 8443\nupstream = one\n"
    assert stat.S_IMODE((fleet.root / "etc/motd").stat().st_mode) == 0o644
    kinds = [p for _, p in fleet.outbox()]
    assert any(b'"type":"drift_detected"' in p for p in kinds)
    assert any(b'"type":"drift_corrected"' in p for p in kinds)
    assert check_drift(fleet.config).findings == ()


def test_drift_is_only_recorded_in_audit_mode(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    audit = fleet.write_config(mode="audit")
    (fleet.root / "etc/motd").write_text("local edit\n")
    report = check_drift(audit)
    assert [f.resource_id for f in report.findings] == ["file:/etc/motd"]
    assert not report.corrected
    assert (fleet.root / "etc/motd").read_text() == "local edit\n"
    payloads = [p for _, p in fleet.outbox()]
    assert any(b'"type":"drift_detected"' in p for p in payloads)
    assert not any(b'"type":"drift_corrected"' in p for p in payloads)


def test_pause_stops_applying_and_resume_catches_up(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    pause(fleet.config, "investigating the gateway")
    assert status(fleet.config)["paused"] == "investigating the gateway"
    fleet.publish({"bundles/app/files/app.conf": "listen = 1\n"})
    before = snapshot(fleet.root)
    result = sync_once(fleet.config)
    assert result.outcome == "paused"
    assert snapshot(fleet.root) == before
    (fleet.root / "etc/motd").write_text("hand edit during the incident\n")
    assert not check_drift(fleet.config).corrected
    resume(fleet.config)
    assert status(fleet.config)["paused"] is None
    result = sync_once(fleet.config)
    assert result.outcome == "applied"
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 1\n"
    assert (fleet.root / "etc/motd").read_text() == "managed by edge-fleet\n"
    payloads = [p for _, p in fleet.outbox()]
    assert any(b'"type":"paused"' in p and b"investigating" in p for p in payloads)
    assert any(b'"type":"resumed"' in p for p in payloads)


def test_plan_shows_a_diff_and_changes_nothing(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    fleet.publish({"bundles/app/files/app.conf": "listen = 8443\nupstream = two\n"})
    before = snapshot(fleet.root)
    text = plan_only(fleet.config)
    assert "/etc/app/app.conf" in text
    assert "-upstream = one" in text
    assert "+upstream = two" in text
    # edge-agent plan --json: the same plan as one JSON document.
    doc = json.loads(plan_only(fleet.config, as_json=True))
    assert doc["release"] == 2
    assert doc["noop"] is False
    [change] = [c for c in doc["changes"] if "/etc/app/app.conf" in c["summary"]]
    assert "+upstream = two" in change["diff"]
    assert change["prune"] is False
    assert snapshot(fleet.root) == before
    assert status(fleet.config)["installed"]["version"] == 1


def test_apply_lock_refuses_a_second_apply(fleet: AgentFleet) -> None:
    fleet.publish(base_release(fleet.root))
    with apply_lock(fleet.config.state_dir), pytest.raises(LockedError):
        sync_once(fleet.config)


def test_sealed_secret_lands_and_its_plaintext_leaks_nowhere(fleet: AgentFleet,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    plaintext = b"wifi-psk-Zq9xK2mV7pL4-plaintext"
    ident = init_identity(fleet.config.state_dir)
    sealed_path = fleet.work.path / "secrets" / "wifi-psk.sealed.json"
    sealed_path.parent.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "fleet_server.fleetctl", "secret", "seal", "--to", ident.encryption_public,
         "--id", "wifi-psk", "--out", str(sealed_path)],
        input=plaintext, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    files = base_release(fleet.root)
    files["bundles/app/bundle.yaml"] = bundle([
        {"kind": "secret_file", "path": "/etc/app/wifi.psk", "secret": "secrets/wifi-psk.sealed.json"},
        {"kind": "file", "path": "/etc/motd", "content": "managed\n"},
    ])
    fleet.publish(files)
    caplog.set_level("DEBUG")
    text = plan_only(fleet.config)
    assert "/etc/app/wifi.psk" in text
    result = sync_once(fleet.config)
    assert result.outcome == "applied", result
    target = fleet.root / "etc/app/wifi.psk"
    assert target.read_bytes() == plaintext
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.write_bytes(b"changed on the device")
    report = check_drift(fleet.config)
    assert report.corrected
    assert target.read_bytes() == plaintext
    needle = plaintext.decode()
    assert needle not in text
    assert needle not in caplog.text
    assert plaintext not in fleet.db_bytes()
    for _, payload in fleet.outbox():
        assert plaintext not in payload
    for path in fleet.config.state_dir.rglob("*"):
        if path.is_file() and "backups" not in path.parts:
            assert plaintext not in path.read_bytes(), path


def gateway_release(port: int = 8443, somaxconn: str = "1024",
                    health: list[dict[str, Any]] | None = None) -> dict[str, str]:
    unit = "[Unit]\nDescription=gateway\n[Service]\nExecStart=/opt/gateway/bin/gateway\n"
    checks = health or [{"kind": "systemd_active", "unit": "gateway-app.service", "timeout": 5}]
    return {
        "bundles/gateway/bundle.yaml": bundle([
            {"kind": "file", "id": "gateway-config", "path": "/etc/gateway/gateway.conf",
             "content": f"port = {port}\n"},
            {"kind": "systemd_unit", "name": "gateway-app.service", "content": unit, "enabled": True,
             "running": True, "watch": ["gateway-config"]},
            {"kind": "sysctl", "name": "net.core.somaxconn", "value": somaxconn},
        ], health=checks),
    }


def test_gateway_units_and_sysctl_with_restart_on_watch(fleet: AgentFleet,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystem.install(fleet.tmp, monkeypatch)
    fake.add_unit_dir(fleet.root / "etc/systemd/system")
    fake.set_sysctl("net.core.somaxconn", "128")
    (fleet.root / "etc/systemd/system").mkdir(parents=True)
    fleet.publish(gateway_release())
    result = sync_once(fleet.config)
    assert result.outcome == "applied", result
    assert fake.unit("gateway-app.service") == {"enabled": "enabled", "active": "active"}
    assert fake.sysctl("net.core.somaxconn") == "1024"
    assert (fleet.root / "etc/systemd/system/gateway-app.service").exists()
    dropin = fleet.root / "etc/sysctl.d/60-edge-fleet-net.core.somaxconn.conf"
    assert dropin.read_text().strip().endswith("1024")
    fake.clear_calls()
    fleet.publish(gateway_release(port=9443))
    assert sync_once(fleet.config).outcome == "applied"
    restarts = [c for c in fake.calls("systemctl") if c[1] in ("restart", "try-restart")]
    assert [c[2:] for c in restarts] == [["--", "gateway-app.service"]]
    # A failing health check puts everything back, the kernel parameter included.
    before = snapshot(fleet.root)
    bad = gateway_release(port=1, somaxconn="4096",
                          health=[{"kind": "command", "name": "gateway-probe", "run": ["false"]}])
    fleet.publish(bad)
    result = sync_once(fleet.config)
    assert result.outcome == "rolled_back", result
    assert snapshot(fleet.root) == before
    assert fake.sysctl("net.core.somaxconn") == "1024"


def test_a_kind_whose_driver_cannot_work_refuses_the_whole_release(fleet: AgentFleet,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = fleet.tmp / "empty-bin"
    empty_bin.mkdir()
    (empty_bin / "true").symlink_to("/bin/true")
    files = base_release(fleet.root)
    files.update(gateway_release())
    fleet.publish(files)
    monkeypatch.setenv("PATH", str(empty_bin))  # no systemctl, no sysctl
    before = snapshot(fleet.root)
    result = sync_once(fleet.config)
    assert result.outcome == "refused", result
    assert "systemctl" in (result.reason or "")
    assert snapshot(fleet.root) == before


def test_root_key_rotation_is_followed_without_touching_the_device(fleet: AgentFleet) -> None:
    new_key = SigningKey.generate()
    old_text, new_text = format_verify_key(fleet.key.verify_key), format_verify_key(new_key.verify_key)
    rotate_root(fleet.work.path, [old_text], threshold=1, signing_keys=[fleet.key])
    rotate_root(fleet.work.path, [new_text], threshold=1, signing_keys=[fleet.key, new_key])
    fleet.publish(base_release(fleet.root), keys=[new_key])
    result = sync_once(fleet.config)
    assert result.outcome == "applied", result
    before = snapshot(fleet.root)
    fleet.publish({"bundles/app/files/app.conf": "signed by a retired key\n"}, keys=[fleet.key])
    result = sync_once(fleet.config)
    assert result.outcome == "refused", result
    assert snapshot(fleet.root) == before
