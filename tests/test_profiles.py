"""edge_core.profiles: the shipped profiles and the profile format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_core.errors import ConfigError
from edge_core.paths import is_under
from edge_core.profiles import load_profile, parse_profile
from edge_core.resources import RESOURCE_KINDS, DiskFreeCheck, MemoryCheck, TemperatureCheck
from fleet_server.authoring.problems import load_all_profiles

SHIPPED = Path(__file__).resolve().parent.parent / "device_profiles"


def test_generic_linux_profile() -> None:
    p = load_profile("generic-linux", [SHIPPED])
    assert p.drivers == frozenset(RESOURCE_KINDS)
    assert {"/etc", "/opt", "/srv", "/usr/local", "/var/lib"} <= set(p.allowed_roots)
    assert is_under("/etc/edge-agent/agent.yaml", p.denied_roots)
    assert is_under("/var/lib/edge-agent/state.db", p.denied_roots)
    assert DiskFreeCheck(name="root-disk-free", path="/", min_free_percent=5.0) in p.health
    assert MemoryCheck(name="memory-in-use", max_used_percent=95.0) in p.health


def test_gateway_profile_is_constrained() -> None:
    p = load_profile("gateway", [SHIPPED])
    assert "command" not in p.drivers
    assert p.drivers == frozenset(RESOURCE_KINDS) - {"command"}
    assert is_under("/etc/motd", p.allowed_roots)
    assert is_under("/etc/chrony/chrony.conf", p.allowed_roots)
    assert not is_under("/etc/motd.d/x", p.allowed_roots)
    assert not is_under("/etc/passwd", p.allowed_roots)
    assert DiskFreeCheck(name="root-disk-free", path="/", min_free_percent=10.0) in p.health
    assert TemperatureCheck(name="cpu-temperature", max_celsius=80.0) in p.health


def test_load_all_profiles_earlier_dir_wins(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("name: gateway\nallowed_roots: [/srv/x]\ndrivers: [file]\n")
    (tmp_path / "README.txt").write_text("not a profile")
    found = load_all_profiles([tmp_path, SHIPPED, tmp_path / "missing"])
    assert set(found) == {"gateway", "generic-linux"}
    assert found["gateway"].allowed_roots == ("/srv/x",)
    assert found["gateway"].health == ()
    assert load_all_profiles([SHIPPED, tmp_path])["gateway"].allowed_roots != ("/srv/x",)


def test_load_profile_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile("nope", [SHIPPED])
    with pytest.raises(ConfigError, match="invalid device profile name"):
        load_profile("../etc/passwd", [SHIPPED])
    (tmp_path / "other.yaml").write_text("name: renamed\nallowed_roots: [/srv]\ndrivers: [file]\n")
    with pytest.raises(ConfigError, match="does not match its file name"):
        load_profile("other", [tmp_path])
    (tmp_path / "broken.yaml").write_text("name: broken\nallowed_roots: [/srv\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_profile("broken", [tmp_path])


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([], "must be a mapping"),
        ({"name": "x", "allowed_roots": ["/srv"], "drivers": ["file"], "extra": 1}, "unknown profile key"),
        ({"name": "Bad Name", "allowed_roots": ["/srv"], "drivers": ["file"]}, "'name'"),
        ({"name": "x", "allowed_roots": [], "drivers": ["file"]}, "non-empty list"),
        ({"name": "x", "allowed_roots": ["srv"], "drivers": ["file"]}, "absolute"),
        ({"name": "x", "allowed_roots": ["/srv/../etc"], "drivers": ["file"]}, "escapes"),
        ({"name": "x", "allowed_roots": ["/srv"], "drivers": ["file", "package"]}, "unknown driver"),
        ({"name": "x", "allowed_roots": ["/srv"], "drivers": []}, "'drivers'"),
        ({"name": "x", "allowed_roots": ["/srv"], "drivers": ["file"], "health": [{"kind": "ping"}]},
         "unknown health check kind"),
        ({"name": "x", "allowed_roots": ["/srv"], "drivers": ["file"], "denied_roots": "/srv/a"},
         "denied_roots"),
    ],
)
def test_parse_profile_errors(value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_profile(value)
    assert fragment in str(info.value)
