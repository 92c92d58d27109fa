"""The device's broker link over TLS, against a real Mosquitto TLS listener on 127.0.0.1: the
broker's certificate is verified against ``mqtt.tls.ca_file`` or the system's trust store; an
empty ``mqtt.tls`` section means TLS with the trust store, never plaintext; a broker whose
certificate no trusted CA signed is refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from edge_agent.config import load_config
from edge_agent.report.mqtt import MqttLink, MqttSettings, settings_from_config
from tests.support.broker import Mosquitto
from tests.support.mirror import free_port
from tests.support.tls import Certificates, hashed_store, make_ca

pytestmark = [
    pytest.mark.timeout(120),
    # After a failed handshake paho drops its TLS socket without closing it; CPython closes it when
    # the last reference goes, with a ResourceWarning that this suite would otherwise turn into an
    # error inside paho's network thread.
    pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. <ssl.SSLSocket"
                               ":pytest.PytestUnraisableExceptionWarning"),
]


@dataclass(frozen=True)
class Cas:
    broker: Certificates  # signed the broker's certificate
    other: Certificates  # signed nothing the broker presents


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Cas:
    base = tmp_path_factory.mktemp("mqtt-tls")
    return Cas(make_ca(base / "broker"), make_ca(base / "other", "another CA"))


@pytest.fixture(scope="module")
def tls_broker(cas: Cas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    port = free_port()
    certs = cas.broker
    config = (f"per_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
              f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n")
    with Mosquitto(tmp_path_factory.mktemp("tls-broker"), port=port, base_config=config) as broker:
        yield broker


def connects(settings: MqttSettings, wait: float) -> bool:
    """Whether the link connects within ``wait`` seconds and the broker acknowledges a publish."""
    link = MqttLink(settings)
    link.start()
    try:
        if not link.wait_connected(wait):
            return False
        return link.publish(f"{settings.prefix}/{settings.device_id}/probe", b"{}", qos=1).wait(10)
    finally:
        link.stop(offline_wait=1)


def test_the_broker_is_verified_against_the_configured_ca(tls_broker: Mosquitto, cas: Cas,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert connects(MqttSettings(host="127.0.0.1", port=tls_broker.port, device_id="dev-1",
                                 tls_ca=cas.broker.ca), 10)
    caplog.set_level(logging.WARNING, logger="edge_agent.report.mqtt")
    assert not connects(MqttSettings(host="127.0.0.1", port=tls_broker.port, device_id="dev-2",
                                     tls_ca=cas.other.ca), 3)
    # the log says why, as the runbook (docs/operations.md) tells an operator to look for
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot connect")]
    assert refusals
    assert all("certificate verify failed" in line and line.endswith("; retrying") for line in refusals)


def test_an_empty_tls_section_means_tls_with_the_trust_store(tls_broker: Mosquitto, cas: Cas, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "device_id": "dev-3", "repo": {"url": "file:///srv/mirror.git"},
        "trust": {"keys": ["ed25519:" + "A" * 43 + "="]},
        "mqtt": {"host": "127.0.0.1", "port": tls_broker.port, "tls": {}},
    }))
    settings = settings_from_config(load_config(path))
    assert settings.uses_tls
    assert settings.tls_ca is None
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_store(tmp_path / "trusted", cas.broker.ca)))
    assert connects(settings, 10)
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_store(tmp_path / "untrusted", cas.other.ca)))
    assert not connects(settings, 3)


def test_tls_never_falls_back_to_plaintext(broker: Mosquitto) -> None:
    plain = MqttSettings(host="127.0.0.1", port=broker.port, device_id="dev-4")
    assert connects(plain, 10)
    assert not connects(MqttSettings(host="127.0.0.1", port=broker.port, device_id="dev-5", tls=True), 3)
