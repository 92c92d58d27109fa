"""fleet-server configuration: defaults, YAML, --set overrides, errors naming the field."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import fleet_server.config as config_mod
from edge_core.trust.keys import format_verify_key
from fleet_server.config import ServerConfig, load_server_config, parse_server_config, parse_set_options
from fleet_server.errors import ServerConfigError
from fleet_server.main import build_parser, overrides_from_args


def key() -> str:
    return format_verify_key(SigningKey.generate().verify_key)


def test_all_is_pinned():
    assert "load_server_config" in config_mod.__all__
    assert all(hasattr(config_mod, name) for name in config_mod.__all__)


def test_defaults_without_a_file():
    c = load_server_config(None, {})
    assert c == ServerConfig()
    assert (c.mqtt.host, c.mqtt.port, c.mqtt.client_id, c.mqtt.prefix, c.mqtt.protocol) == (
        "127.0.0.1", 1883, "fleet-server", "fleet/v1", "5")
    assert c.store.path == Path("/var/lib/fleet-server/fleet.db")
    assert (c.store.events_retention, c.store.health_retention) == (30 * 86400.0, 7 * 86400.0)
    assert (c.ingest.max_payload_bytes, c.ingest.batch_size, c.ingest.batch_interval) == (65536, 1000, 0.1)
    assert c.ingest.unknown_devices == "accept"
    assert (c.http.host, c.http.port, c.http.admin_token_file, c.http.read_token_file) == (
        "127.0.0.1", 8080, None, None)
    assert (c.git.url, c.git.branch, c.git.poll_interval, c.git.trust.threshold) == (None, "main", 60.0, 1)


def test_full_file_with_relative_paths(tmp_path: Path):
    k1, k2 = key(), key()
    (tmp_path / "server.yaml").write_text(f"""
mqtt:
  host: broker.example.invalid
  username: fleet-server
  password_file: secrets/mqtt.pw
  tls: {{ca_file: ca.pem}}
store: {{path: data/fleet.db, events_retention: 90d, health_retention: 12h}}
ingest: {{max_payload_bytes: 32KiB, batch_size: 500, batch_interval: 250ms, unknown_devices: refuse}}
http: {{port: 9000, admin_token_file: admin.token}}
git:
  url: https://git.example.invalid/fleet.git
  poll_interval: 5m
  trust: {{keys: [{k1}, {k2}], threshold: 2}}
log_level: debug
""")
    c = load_server_config(tmp_path / "server.yaml", {})
    assert c.mqtt.port == 8883  # TLS default
    assert c.mqtt.password_file == tmp_path / "secrets/mqtt.pw"
    assert c.mqtt.tls is not None
    assert c.mqtt.tls.ca_file == tmp_path / "ca.pem"
    assert c.store.path == tmp_path / "data/fleet.db"
    assert (c.store.events_retention, c.store.health_retention) == (90 * 86400.0, 12 * 3600.0)
    assert (c.ingest.max_payload_bytes, c.ingest.batch_size, c.ingest.batch_interval) == (32768, 500, 0.25)
    assert c.ingest.unknown_devices == "refuse"
    assert c.http.admin_token_file == tmp_path / "admin.token"
    assert c.git.trust.keys == (k1, k2)
    assert c.git.trust.threshold == 2
    assert c.git.poll_interval == 300.0
    assert c.log_level == "debug"


def test_overrides_beat_the_file(tmp_path: Path):
    (tmp_path / "s.yaml").write_text("mqtt: {port: 1000}\nhttp: {port: 1001}\n")
    c = load_server_config(tmp_path / "s.yaml", {"mqtt.port": 2000, "ingest.unknown_devices": "refuse",
                                                 "git.trust.threshold": 1})
    assert (c.mqtt.port, c.http.port, c.ingest.unknown_devices) == (2000, 1001, "refuse")


def test_set_options_are_read_as_yaml_values():
    assert parse_set_options(["mqtt.port=1884", "ingest.batch_interval=50ms", "git.trust.keys=[a, b]",
                              "mqtt.username=", "http.host=0.0.0.0", "x.y={a: 1}"]) == {
        "mqtt.port": 1884, "ingest.batch_interval": "50ms", "git.trust.keys": ["a", "b"],
        "mqtt.username": None, "http.host": "0.0.0.0", "x.y": "{a: 1}"}
    with pytest.raises(ServerConfigError, match=r"section\.key=value"):
        parse_set_options(["mqtt.port"])
    with pytest.raises(ServerConfigError, match=r"section\.key=value"):
        parse_set_options(["=3"])


def test_command_line_shortcuts(tmp_path: Path):
    args = build_parser().parse_args(["--set", "mqtt.port=1", "--mqtt-port", "1885", "--http-port", "0",
                                      "--db", str(tmp_path / "x.db"), "--set", "ingest.batch_size=10"])
    c = load_server_config(None, overrides_from_args(args))
    assert (c.mqtt.port, c.http.port, c.store.path, c.ingest.batch_size) == (1885, 0, tmp_path / "x.db", 10)


def test_store_url_defaults_to_the_sqlite_path_and_takes_postgresql(tmp_path: Path):
    assert load_server_config(None, {}).store.url == "sqlite:///var/lib/fleet-server/fleet.db"
    old = load_server_config(None, {"store.path": str(tmp_path / "old.db")}).store
    assert (old.url, old.path, old.backend) == (f"sqlite://{tmp_path / 'old.db'}", tmp_path / "old.db",
                                                "sqlite")
    args = build_parser().parse_args(["--set", "store.url=postgresql://fleet@127.0.0.1:5432/fleet",
                                      "--set", "store.password_file=db.password"])
    pg_store = load_server_config(None, overrides_from_args(args)).store
    assert (pg_store.url, pg_store.backend) == ("postgresql://fleet@127.0.0.1:5432/fleet", "postgresql")
    assert pg_store.password_file == Path.cwd() / "db.password"
    relative = parse_server_config({"store": {"url": "sqlite://data/fleet.db"}}, tmp_path).store
    assert relative.path == tmp_path / "data/fleet.db"
    assert relative.url == f"sqlite://{relative.path}"


@pytest.mark.parametrize(("store", "reason"), [
    ({"url": "postgresql://fleet:s3cret@db:5432/fleet"}, "must not carry a password"),
    ({"url": "postgresql://fleet@db:5432/fleet?password=s3cret"}, "must not carry a password"),
    ({"url": "mysql://fleet@db/fleet"}, "must be sqlite://FILE or postgresql://"),
    ({"url": "postgresql://fleet@db:5432/"}, "must be postgresql://USER@HOST:PORT/DATABASE"),
    ({"url": "postgresql://fleet@db:99999/fleet"}, "not a valid URL"),
    ({"url": "sqlite://"}, "needs a file"),
    ({"url": "sqlite:///x.db", "path": "/y.db"}, "not both"),
    ({"password_file": "/etc/p"}, "only a postgresql:// store.url takes a password"),
])
def test_bad_store_urls_are_refused_in_one_line_without_the_password(store, reason):
    with pytest.raises(ServerConfigError, match=r"^store\.") as info:
        parse_server_config({"store": store}, Path("/"))
    assert reason in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"mqtt.port": 0}, "mqtt.port"),
    ({"mqtt.port": "x"}, "mqtt.port"),
    ({"mqtt.protocol": "3.1.1"}, "mqtt.protocol"),
    ({"mqtt.prefix": "fleet/#"}, "mqtt.prefix"),
    ({"mqtt.client_id": "a b"}, "mqtt.client_id"),
    ({"mqtt.password_file": "/x"}, "mqtt.password_file"),
    ({"mqtt.tls.cert_file": "/c"}, "mqtt.tls"),
    ({"mqtt.colour": "red"}, "mqtt.colour"),
    ({"store.events_retention": "forever"}, "store.events_retention"),
    ({"store.health_retention": -1}, "store.health_retention"),
    ({"ingest.max_payload_bytes": 10}, "ingest.max_payload_bytes"),
    ({"ingest.max_payload_bytes": "lots"}, "ingest.max_payload_bytes"),
    ({"ingest.batch_size": 0}, "ingest.batch_size"),
    ({"ingest.batch_size": True}, "ingest.batch_size"),
    ({"ingest.batch_interval": "2h"}, "ingest.batch_interval"),
    ({"ingest.unknown_devices": "maybe"}, "ingest.unknown_devices"),
    ({"http.port": 70000}, "http.port"),
    ({"git.url": "ftp://x"}, "git.url"),
    ({"git.url": "https://x.invalid/r.git"}, "git.trust.keys"),
    ({"git.trust.keys": ["nope"]}, r"git.trust.keys\[0\]"),
    ({"git.trust.keys": "nope"}, "git.trust.keys"),
    ({"git.branch": "../x"}, "git.branch"),
    ({"log_level": "loud"}, "log_level"),
    ({"nonsense": 1}, "nonsense"),
    ({"mqtt": 3}, "mqtt"),
    ({"mqtt.port.x": 3}, "mqtt.port"),
])
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(ServerConfigError, match=rf"^{field}"):
        load_server_config(None, overrides)


def test_threshold_above_key_count_is_refused():
    with pytest.raises(ServerConfigError, match=r"git\.trust\.threshold"):
        load_server_config(None, {"git.trust.keys": [key()], "git.trust.threshold": 2})


def test_file_errors(tmp_path: Path):
    with pytest.raises(ServerConfigError, match="cannot read"):
        load_server_config(tmp_path / "missing.yaml", {})
    (tmp_path / "bad.yaml").write_text("mqtt: [unclosed\n")
    with pytest.raises(ServerConfigError, match="not valid YAML"):
        load_server_config(tmp_path / "bad.yaml", {})
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ServerConfigError, match="mapping"):
        load_server_config(tmp_path / "list.yaml", {})
    (tmp_path / "empty.yaml").write_text("")
    assert load_server_config(tmp_path / "empty.yaml", {}).mqtt.port == 1883


def test_parse_server_config_refuses_non_mapping(tmp_path: Path):
    with pytest.raises(ServerConfigError, match="config: must be a mapping"):
        parse_server_config([1], tmp_path)


def test_an_unknown_key_names_the_file_line_and_nearest_key_but_a_set_value_no_file(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("log_level: info\ningest:\n  bach_size: 10\n")
    with pytest.raises(ServerConfigError) as info:
        load_server_config(path)
    assert str(info.value) == f"{path}:3: ingest.bach_size: unknown key; did you mean ingest.batch_size?"
    path.write_text("log_level: info\n")
    with pytest.raises(ServerConfigError) as info:
        load_server_config(path, parse_set_options(["ingest.batch_size=0"]))
    assert str(info.value).startswith("ingest.batch_size: ")


def test_a_busy_http_port_is_one_line_and_exit_1_before_anything_starts(tmp_path: Path) -> None:
    """The HTTP address is checked before the store, the broker link or any process starts: a port in
    use is refused in one line with exit code 1 (uvicorn exited with 3 after everything had started)."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "fleet_server.main", "--http-port", str(port), "--mqtt-port", "1",
             "--db", str(tmp_path / "fleet.db")],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    finally:
        busy.close()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fleet-server: http: cannot listen on 127.0.0.1:{port}:")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "fleet.db").exists()  # nothing was started or created
