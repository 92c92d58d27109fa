"""agent.yaml parsing: defaults, relative paths, durations, and a ConfigError naming every bad field."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import yaml
from nacl.signing import SigningKey

from edge_agent.config import DEFAULT_PROFILE_DIRS, load_config, parse_duration
from edge_agent.identity import init_identity, load_encryption_private, load_identity
from edge_agent.prefetch import open_source, prefetch
from edge_core.durations import parse_seconds
from edge_core.errors import ConfigError, KeyFileError
from edge_core.trust.keys import format_verify_key

KEY = format_verify_key(SigningKey(b"\x01" * 32).verify_key)
KEY2 = format_verify_key(SigningKey(b"\x02" * 32).verify_key)


def minimal() -> dict:
    return {"device_id": "dev-1", "repo": {"url": "git://127.0.0.1/fleet"}, "trust": {"keys": [KEY]}}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal()))
    assert cfg.device_id == "dev-1"
    assert cfg.profile == "generic-linux"
    assert cfg.profile_dirs == DEFAULT_PROFILE_DIRS
    assert cfg.repo.branch == "main"
    assert cfg.repo.max_fetch_bytes == 256 * 1024 * 1024
    assert cfg.repo.timeout == 30.0
    assert cfg.trust.keys == (KEY,)
    assert cfg.trust.threshold == 1
    assert cfg.mqtt is None
    assert cfg.mqtt_prefix == "fleet/v1"
    assert cfg.mode == "enforce"
    assert (cfg.intervals.poll, cfg.intervals.drift, cfg.intervals.health) == (300.0, 60.0, 60.0)
    assert (cfg.backoff.base, cfg.backoff.cap) == (1.0, 300.0)
    assert cfg.root == Path("/")
    assert cfg.state_dir == Path("/var/lib/edge-agent")
    assert cfg.log_level == "info"
    assert dict(cfg.labels) == {}


def test_full_config_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    data = minimal() | {
        "labels": {"site": "berlin", "canary": "true", "rack": 7},
        "profile": "raspberry-pi",
        "profile_dirs": ["profiles", "/opt/p"],
        "repo": {"url": "https://127.0.0.1/fleet.git", "branch": "prod",
                 "auth": {"token_file": "token", "username": "dev"}, "max_fetch_bytes": "64MiB",
                 "timeout": "1m"},
        "trust": {"keys": [KEY, KEY2], "threshold": 2},
        "mqtt": {"host": "127.0.0.1", "tls": {"ca_file": "ca.pem"}, "protocol": "3.1.1",
                 "prefix": "acme/v1", "keepalive": 30, "password_file": "mqtt.pw"},
        "mode": "audit",
        "intervals": {"poll": "5m", "drift": 90, "health": "1h"},
        "backoff": {"base": "500ms", "cap": "10m"},
        "root": "root", "state_dir": "state", "log_level": "debug",
    }
    cfg = load_config(write(tmp_path, data))
    base = tmp_path.resolve()
    assert dict(cfg.labels) == {"site": "berlin", "canary": "true", "rack": "7"}
    assert cfg.profile_dirs == (base / "profiles", Path("/opt/p"))
    assert cfg.repo.branch == "prod"
    assert cfg.repo.auth.token_file == base / "token"
    assert cfg.repo.max_fetch_bytes == 64 * 1024 * 1024
    assert cfg.repo.timeout == 60.0
    assert cfg.trust.threshold == 2
    assert cfg.mqtt is not None
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.ca_file == base / "ca.pem"
    assert cfg.mqtt.password_file == base / "mqtt.pw"
    assert cfg.mqtt_prefix == "acme/v1"
    assert cfg.mode == "audit"
    assert (cfg.intervals.poll, cfg.intervals.drift, cfg.intervals.health) == (300.0, 90.0, 3600.0)
    assert (cfg.backoff.base, cfg.backoff.cap) == (0.5, 600.0)
    assert cfg.root == base / "root"
    assert cfg.state_dir == base / "state"


@pytest.mark.parametrize(("value", "seconds"), [(30, 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
                                                 ("2d", 172800.0), ("250ms", 0.25), (" 7 ", 7.0), (1.5, 1.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize("value", ["", "5 minutes", "-1s", 0, True, "1y", [1], "1.2.3s"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^x: "):
        parse_duration(value, "x")


@pytest.mark.parametrize(("patch", "field"), [
    ({"device_id": None}, "device_id"),
    ({"device_id": "a/b"}, "device_id"),
    ({"device_id": "dev+1"}, "device_id"),
    ({"device_id": "#"}, "device_id"),
    ({"device_id": "x" * 65}, "device_id"),
    ({"colour": "blue"}, "colour"),
    ({"repo": None}, "repo"),
    ({"repo": {"url": "ftp://x/y"}}, "repo.url"),
    ({"repo": {"url": "git://h/r", "branch": "../x"}}, "repo.branch"),
    ({"repo": {"url": "git://h/r", "extra": 1}}, "repo.extra"),
    ({"repo": {"url": "git://h/r", "auth": {"token": "inline"}}}, "repo.auth.token"),
    ({"repo": {"url": "git://h/r", "max_fetch_bytes": "lots"}}, "repo.max_fetch_bytes"),
    ({"repo": {"url": "git://h/r", "timeout": "soon"}}, "repo.timeout"),
    ({"repo": {"url": "git://h/r", "max_fetch_bytes": 512}}, "repo.max_fetch_bytes"),
    ({"repo": {"url": "git://h/r", "auth": []}}, "repo.auth"),
    ({"intervals": ["1h"]}, "intervals"),
    ({"trust": {"keys": []}}, "trust.keys"),
    ({"trust": {"keys": ["ed25519:AAAA"]}}, "trust.keys[0]"),
    ({"trust": {"keys": [KEY], "threshold": 2}}, "trust.threshold"),
    ({"trust": {"keys": [KEY], "threshold": 0}}, "trust.threshold"),
    ({"mqtt": {"port": 1883}}, "mqtt.host"),
    ({"mqtt": {"host": "h", "protocol": "4"}}, "mqtt.protocol"),
    ({"mqtt": {"host": "h", "prefix": "fleet/+/x"}}, "mqtt.prefix"),
    ({"mqtt": {"host": "h", "port": 70000}}, "mqtt.port"),
    ({"mqtt": {"host": "h", "tls": {"cert_file": "c.pem"}}}, "mqtt.tls"),
    ({"mode": "yolo"}, "mode"),
    ({"intervals": {"poll": "never"}}, "intervals.poll"),
    ({"intervals": {"reboot": "1h"}}, "intervals.reboot"),
    ({"backoff": {"base": "10m", "cap": "1s"}}, "backoff.cap"),
    ({"labels": ["a"]}, "labels"),
    ({"labels": {"site": None}}, "labels.site"),
    ({"profile_dirs": "/etc"}, "profile_dirs"),
    ({"log_level": "loud"}, "log_level"),
    ({"root": 5}, "root"),
])
def test_invalid_fields_are_named(tmp_path: Path, patch: dict, field: str) -> None:
    data = minimal()
    for k, v in patch.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # The file, then the line of the key when it is in the file, then the dotted key.
    shown = str(info.value)
    assert re.match(rf"{re.escape(str(path))}:(\d+: )? ?{re.escape(field)}:", shown), shown
    assert "\n" not in str(info.value)


def test_an_unknown_key_names_the_file_and_line_and_the_nearest_known_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: gw-1\nrepo:\n  url: https://git.example/config.git\n  branhc: main\n"
                    "lables:\n  site: berlin\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:5: lables: unknown key; did you mean labels?"
    (tmp_path / "agent.yaml").write_text("device_id: gw-1\nrepo:\n  url: https://git.example/c.git\n"
                                         "  branhc: main\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:4: repo.branhc: unknown key; did you mean repo.branch?"


def test_a_missing_field_says_required(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: gw-1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: repo: is required"


@pytest.mark.parametrize("text", ["", "device_id: [unclosed", "- a list\n", "\xff"])
def test_unreadable_documents(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_identity_created_once_and_never_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = init_identity(state)
    assert first.created
    assert first.signing_public.startswith("ed25519:")
    assert first.encryption_public.startswith("x25519:")
    for name in ("identity.key", "encryption.key"):
        assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600
    before = (state / "identity.key").read_bytes()
    second = init_identity(state)
    assert not second.created
    assert second.signing_public == first.signing_public
    assert second.encryption_public == first.encryption_public
    assert (state / "identity.key").read_bytes() == before
    loaded = load_identity(state)
    assert loaded.signing_public == first.signing_public
    assert load_encryption_private(state).public_key.encode() != b""


def test_identity_missing_or_too_open(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_identity(tmp_path)
    init_identity(tmp_path)
    os.chmod(tmp_path / "encryption.key", 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_identity(tmp_path)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30.0), (45, 45.0), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("2d", 172800.0), ("1w", 604800.0), (" 2m ", 120.0)])
def test_one_duration_parser(text: object, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["", "m", "5 m", "30m1h", "1y", "-5s", True, None, [], float("nan"), -1])
def test_duration_refusals(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_seconds(bad)


def test_labels_are_bounded_as_the_status_report_carries_them(tmp_path: Path) -> None:
    base = {"device_id": "d1", "repo": {"url": "file:///m"}, "trust": {"keys": [KEY]}}
    too_many = {f"k{i}": "v" for i in range(65)}
    for labels, reason in ((too_many, "at most 64"), ({"k": "x" * 257}, "longer than 256")):
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump({**base, "labels": labels}))
        with pytest.raises(ConfigError, match=reason):
            load_config(path)


def test_unreadable_mirror_credential_file_is_a_config_error_not_a_fetch_error(tmp_path: Path) -> None:
    """A credential file that cannot be read is a setup problem: ConfigError naming the key, which
    the daemon reports instead of retrying a fetch that cannot succeed."""
    (tmp_path / "token").mkdir()  # a directory: reading it fails even as root
    data = minimal() | {"repo": {"url": "https://127.0.0.1/fleet.git",
                                 "auth": {"token_file": "token"}},
                        "state_dir": "state"}
    cfg = load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"^repo\.auth\.token_file: cannot read .*token: Is a directory$"):
        open_source(cfg)
    with pytest.raises(ConfigError, match=r"repo\.auth\.token_file"):
        prefetch(cfg, None)
