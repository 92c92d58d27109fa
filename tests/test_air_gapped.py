"""Air-gapped updates end to end: ``fleetctl release export`` writes a signed release to a real ``git
bundle`` file; a device with no mirror and no broker at all applies it with ``edge-agent import``
(the same checks, transaction and journal as a fetch); its reports wait in the outbox and, once a
real Mosquitto is there, arrive saying the release came from a file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from edge_agent.agent import status
from edge_agent.cli import main as edge_agent
from edge_agent.config import AgentConfig, load_config
from edge_core.trust.keys import format_verify_key
from fleet_server import fleetctl
from tests.support.agent_fleet import AgentFleet, base_release
from tests.support.agent_mqtt import ALL, PREFIX, RunningAgent, events
from tests.support.broker import Mosquitto, Subscriber
from tests.support.mirror import free_port
from tests.support.wait import wait_until


def offline_config(fleet: AgentFleet, broker_port: int, **repo: object) -> AgentConfig:
    """The device's agent.yaml pointed at a mirror and a broker that do not exist."""
    data = yaml.safe_load(fleet.config_path.read_text())
    data["repo"] = {"url": f"git://127.0.0.1:{free_port()}/fleet.git", "timeout": "2s", **repo}
    data["mqtt"] = {"host": "127.0.0.1", "port": broker_port, "keepalive": 5}
    data["intervals"] = {"poll": "1h", "drift": "1h", "health": "1h"}
    fleet.config_path.write_text(yaml.safe_dump(data))
    return load_config(fleet.config_path)


def export(fleet: AgentFleet, out: Path, capsys: pytest.CaptureFixture[str],
           *extra: str) -> dict[str, object]:
    capsys.readouterr()
    code = fleetctl.main(["release", "export", str(fleet.work.path), "--out", str(out),
                          "--trust", format_verify_key(fleet.key.verify_key), "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert isinstance(doc, dict)
    return doc


def run_import(fleet: AgentFleet, bundle: Path,
               capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    capsys.readouterr()
    code = edge_agent(["import", str(bundle), "--config", str(fleet.config_path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_device_without_mirror_or_broker_is_updated_from_a_file_and_reports_it_once_online(
        fleet: AgentFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = fleet.publish(base_release(fleet.root))
    usb = tmp_path / "usb"
    usb.mkdir()
    summary = export(fleet, usb / "release-1.bundle", capsys)
    assert (summary["commit"], summary["version"], summary["verified"]) == (first, 1, True)
    verify = subprocess.run(["git", "-C", str(fleet.work.path), "bundle", "verify",
                             str(usb / "release-1.bundle")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert verify.returncode == 0, verify.stderr
    broker_port = free_port()
    offline_config(fleet, broker_port)
    code, result = run_import(fleet, usb / "release-1.bundle", capsys)
    assert (code, result["outcome"], result["commit"], result["release"]) == (0, "applied", first, 1)
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 8443\nupstream = one\n"
    info = status(fleet.config)
    assert info["installed"] == {"version": 1, "commit": first, "bundles": ["app"]}
    assert info["outbox"] > 0  # no broker: the reports wait
    second = fleet.publish({"bundles/app/files/app.conf": "listen = 2\n"})
    export(fleet, usb / "release-2.bundle", capsys)
    code, result = run_import(fleet, usb / "release-2.bundle", capsys)
    assert (code, result["outcome"], result["commit"]) == (0, "applied", second)
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 2\n"
    # the device comes online: every report it queued arrives, saying where the release came from
    with Mosquitto(tmp_path / "broker", port=broker_port) as broker, \
            Subscriber(broker.port, [ALL], client_id="watcher", persistent=True) as sub:
        sub.wait_subscribed(1)
        agent = RunningAgent(load_config(fleet.config_path))
        try:
            assert sub.wait(lambda s: len(events(s, "sync_succeeded")) >= 2, 30), sub.lines[-20:]
            wait_until(lambda: status(fleet.config)["outbox"] == 0, "the outbox drained")
        finally:
            agent.stop()
    succeeded = events(sub, "sync_succeeded")
    assert [(e["commit"], e["detail"]["source"]) for e in succeeded[:2]] == [(first, "file"),
                                                                             (second, "file")]
    assert all(r.topic.startswith(PREFIX) for r in sub.messages())


def test_an_imported_file_gets_every_check_a_fetch_gets(fleet: AgentFleet, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    fleet.publish(base_release(fleet.root))
    good = tmp_path / "good.bundle"
    export(fleet, good, capsys)
    broker_port = free_port()
    # over the size limit of a fetch
    offline_config(fleet, broker_port, max_fetch_bytes="1KiB")
    code, result = run_import(fleet, good, capsys)
    assert (code, result["outcome"]) == (1, "fetch_failed")
    assert "limit" in str(result["reason"])
    offline_config(fleet, broker_port)
    # not a bundle at all
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"PK\x03\x04 a zip file\n")
    code, result = run_import(fleet, junk, capsys)
    assert (code, result["outcome"]) == (1, "fetch_failed")
    assert "not a git bundle" in str(result["reason"])
    # a tampered release: the manifest no longer matches the files
    tampered_sha = fleet.push_unsigned({"bundles/app/files/app.conf": "listen = 6666\n"})
    tampered = tmp_path / "tampered.bundle"
    capsys.readouterr()
    assert fleetctl.main(["release", "export", str(fleet.work.path), "--out", str(tampered)]) == 0
    code, result = run_import(fleet, tampered, capsys)
    assert (code, result["outcome"], result["commit"]) == (1, "refused", tampered_sha)
    assert not (fleet.root / "etc/app/app.conf").exists()
    # with --trust, fleetctl refuses to export it in the first place
    capsys.readouterr()
    assert fleetctl.main(["release", "export", str(fleet.work.path), "--out", str(tmp_path / "no.bundle"),
                          "--trust", format_verify_key(fleet.key.verify_key)]) == 1
    assert "fails verification" in capsys.readouterr().err
    assert not (tmp_path / "no.bundle").exists()
    # the file applies as a fetch would once the good one is given
    code, result = run_import(fleet, good, capsys)
    assert (code, result["outcome"]) == (0, "applied")


def test_export_refuses_a_commit_without_a_signed_release(fleet: AgentFleet, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fleet.work.write_files({"README": "not signed\n"})
    fleet.work.commit("unsigned")
    code = fleetctl.main(["release", "export", str(fleet.work.path), "--out", str(tmp_path / "x.bundle")])
    assert code == 1
    assert "holds no signed release" in capsys.readouterr().err
