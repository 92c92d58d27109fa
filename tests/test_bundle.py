"""edge_core.bundle and edge_core.resources: the bundle.yaml format, selectors and overlays."""

from __future__ import annotations

from typing import Any

import pytest

from edge_core.bundle import DeviceIdentity, Selector, parse_bundle, parse_selector
from edge_core.errors import BundleError
from edge_core.resources import (
    Absent,
    CommandCheck,
    CommandRes,
    Directory,
    DiskFreeCheck,
    File,
    HttpCheck,
    MemoryCheck,
    SecretFile,
    Symlink,
    Sysctl,
    SystemdActiveCheck,
    SystemdUnit,
    TcpCheck,
    TemperatureCheck,
    parse_check,
    parse_resource,
)
from edge_core.yamlsafe import load_yaml
from fleet_server.authoring.problems import parse_bundle_partial

GOOD_RESOURCES: list[tuple[dict[str, Any], Any, str, dict[str, Any]]] = [
    ({"kind": "file", "path": "/etc/motd", "content": "hi\n", "mode": "0644"}, File, "file:/etc/motd",
     {"mode": 0o644, "content": "hi\n", "template": False, "owner": None}),
    ({"kind": "file", "path": "/etc/a.conf", "source": "files/a.conf", "owner": "root", "group": "adm",
      "template": True, "mode": 0o600}, File, "file:/etc/a.conf",
     {"source": "files/a.conf", "owner": "root", "group": "adm", "template": True, "mode": 0o600}),
    ({"kind": "directory", "path": "/opt/app", "mode": "755"}, Directory, "directory:/opt/app",
     {"mode": 0o755}),
    ({"kind": "symlink", "path": "/opt/app/current", "target": "releases/2"}, Symlink,
     "symlink:/opt/app/current", {"target": "releases/2"}),
    ({"kind": "absent", "path": "/etc/old.conf", "id": "old"}, Absent, "old", {"path": "/etc/old.conf"}),
    ({"kind": "systemd_unit", "name": "app.service", "source": "files/app.service", "enabled": True,
      "running": True, "watch": ["file:/etc/a.conf"]}, SystemdUnit, "systemd_unit:app.service",
     {"unit_path": "/etc/systemd/system/app.service", "watch": ("file:/etc/a.conf",), "enabled": True}),
    ({"kind": "systemd_unit", "name": "ssh.service", "running": True}, SystemdUnit,
     "systemd_unit:ssh.service", {"unit_path": None, "paths": ()}),
    ({"kind": "sysctl", "name": "net.core.somaxconn", "value": 1024}, Sysctl, "sysctl:net.core.somaxconn",
     {"value": "1024", "persist": True, "paths": ("/etc/sysctl.d/60-edge-fleet-net.core.somaxconn.conf",)}),
    ({"kind": "sysctl", "name": "vm.swappiness", "value": "10", "persist": False}, Sysctl,
     "sysctl:vm.swappiness", {"paths": ()}),
    ({"kind": "secret_file", "path": "/etc/app/token", "secret": "secrets/app.sealed.json"}, SecretFile,
     "secret_file:/etc/app/token", {"mode": 0o600, "secret": "secrets/app.sealed.json"}),
    ({"kind": "command", "name": "install", "run": ["/usr/bin/apt-get", "install", "-y", "jq"],
      "creates": "/usr/bin/jq", "timeout": 120}, CommandRes, "command:install",
     {"creates": "/usr/bin/jq", "timeout": 120.0, "run": ("/usr/bin/apt-get", "install", "-y", "jq")}),
    ({"kind": "command", "name": "reload", "run": "systemctl reload app", "unless": "test -e /x",
      "refresh_only": True}, CommandRes, "command:reload", {"unless": "test -e /x", "refresh_only": True}),
]


@pytest.mark.parametrize(("raw", "cls", "rid", "fields"), GOOD_RESOURCES)
def test_parse_good_resources(raw: dict[str, Any], cls: type, rid: str, fields: dict[str, Any]) -> None:
    res = parse_resource(raw, "b", ("resources", 0))
    assert type(res) is cls
    assert res.id == rid
    assert res.bundle == "b"
    for name, value in fields.items():
        assert getattr(res, name) == value, name


BAD_RESOURCES: list[tuple[Any, tuple[str | int, ...], str]] = [
    ("just a string", (), "must be a mapping"),
    ({"kind": "package", "name": "x"}, ("kind",), "unknown resource kind 'package'"),
    ({"path": "/etc/x"}, ("kind",), "unknown resource kind None"),
    ({"kind": "file", "path": "/etc/x"}, (), "one of 'content' or 'source' is required"),
    ({"kind": "file", "path": "/etc/x", "content": "a", "source": "f"}, (), "not both"),
    ({"kind": "file", "path": "etc/x", "content": "a"}, ("path",), "must be absolute"),
    ({"kind": "file", "path": "/etc/../root/x", "content": "a"}, ("path",), "escapes"),
    ({"kind": "file", "path": "/etc/x", "content": "a", "mode": "rw-r--r--"}, ("mode",), "octal"),
    ({"kind": "file", "path": "/etc/x", "content": "a", "mode": True}, ("mode",), "octal"),
    ({"kind": "file", "path": "/etc/x", "content": "a", "owner": "Bad User"}, ("owner",), "user or group"),
    ({"kind": "file", "path": "/etc/x", "source": "../other/f"}, ("source",), "escapes"),
    ({"kind": "file", "path": "/etc/x", "source": "/abs/f"}, ("source",), "relative"),
    ({"kind": "file", "path": "/etc/x", "content": 5}, ("content",), "must be a string"),
    ({"kind": "file", "path": "/etc/x", "content": "a", "colour": "red"}, ("colour",), "unknown field"),
    ({"kind": "file", "path": "/etc/x", "content": "a", "template": "yes"}, ("template",), "true or false"),
    ({"kind": "directory"}, ("path",), "non-empty string"),
    ({"kind": "symlink", "path": "/opt/l"}, ("target",), "'target' is required"),
    ({"kind": "absent", "path": "/"}, ("path",), "not normalised"),
    ({"kind": "systemd_unit", "name": "app"}, ("name",), "invalid systemd unit name"),
    ({"kind": "systemd_unit", "name": "a.service", "watch": "x"}, ("watch",), "list of strings"),
    ({"kind": "systemd_unit", "name": "a.service", "enabled": "yes"}, ("enabled",), "true or false"),
    ({"kind": "sysctl", "name": "swappiness", "value": "1"}, ("name",), "invalid sysctl name"),
    ({"kind": "sysctl", "name": "vm.swappiness"}, ("value",), "'value' is required"),
    ({"kind": "sysctl", "name": "vm.swappiness", "value": "1\n2"}, ("value",), "one line"),
    ({"kind": "secret_file", "path": "/etc/t"}, ("secret",), "'secret'"),
    ({"kind": "command", "name": "x"}, ("run",), "'run' is required"),
    ({"kind": "command", "name": "x", "run": []}, ("run",), "non-empty list"),
    ({"kind": "command", "name": "x", "run": "true", "timeout": -1}, ("timeout",), "at least 0"),
    ({"kind": "file", "id": "bad id!", "path": "/etc/x", "content": "a"}, ("id",), "invalid resource id"),
]


@pytest.mark.parametrize(("raw", "where", "fragment"), BAD_RESOURCES)
def test_parse_bad_resources(raw: Any, where: tuple[str | int, ...], fragment: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_resource(raw, "b", ("resources", 3))
    assert info.value.where == ("resources", 3, *where)
    assert fragment in info.value.reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"kind": "command", "run": ["/bin/true"]}, CommandCheck(name="command", run=("/bin/true",))),
        ({"kind": "systemd_active", "unit": "a.service", "timeout": 3},
         SystemdActiveCheck(name="systemd_active", timeout=3.0, unit="a.service")),
        ({"kind": "tcp", "name": "web", "port": 8080}, TcpCheck(name="web", host="127.0.0.1", port=8080)),
        ({"kind": "http", "url": "http://127.0.0.1:8080/health", "expect_status": 204},
         HttpCheck(name="http", url="http://127.0.0.1:8080/health", expect_status=204)),
        ({"kind": "disk_free", "path": "/", "min_free_percent": 5},
         DiskFreeCheck(name="disk_free", path="/", min_free_percent=5.0)),
        ({"kind": "memory"}, MemoryCheck(name="memory", max_used_percent=90.0)),
        ({"kind": "temperature", "max_celsius": 70}, TemperatureCheck(name="temperature", max_celsius=70.0)),
    ],
)
def test_parse_good_checks(raw: dict[str, Any], expected: Any) -> None:
    assert parse_check(raw) == expected


@pytest.mark.parametrize(
    ("raw", "where", "fragment"),
    [
        ({"kind": "ping"}, ("kind",), "unknown health check kind"),
        ({"kind": "tcp", "port": 70000}, ("port",), "1 to 65535"),
        ({"kind": "tcp"}, ("port",), "1 to 65535"),
        ({"kind": "http", "url": "ftp://x"}, ("url",), "http://"),
        ({"kind": "disk_free", "min_free_percent": 150}, ("min_free_percent",), "percentage"),
        ({"kind": "memory", "unit": "x"}, ("unit",), "unknown field"),
        ({"kind": "systemd_active"}, ("unit",), "'unit' is required"),
    ],
)
def test_parse_bad_checks(raw: dict[str, Any], where: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_check(raw, ("health", 1))
    assert info.value.where == ("health", 1, *where)
    assert fragment in info.value.reason


GW = DeviceIdentity("gw-1", {"role": "gateway", "site": "berlin", "canary": "true"}, "gateway")
SRV = DeviceIdentity("srv-9", {"role": "server"}, "generic-linux")


@pytest.mark.parametrize(
    ("raw", "device", "matches"),
    [
        ({"labels": {"role": "gateway"}}, GW, True),
        ({"labels": {"role": "gateway"}}, SRV, False),
        ({"labels": {"role": ["gateway", "server"]}}, SRV, True),
        ({"labels": {"role": "gateway", "site": "paris"}}, GW, False),
        ({"labels": {"canary": True}}, GW, True),
        ({"labels": {"missing": "x"}}, GW, False),
        ({"profiles": ["gateway"]}, GW, True),
        ({"profiles": ["gateway"]}, SRV, False),
        ({"devices": ["srv-9", "srv-10"]}, SRV, True),
        ({"devices": ["srv-10"]}, SRV, False),
        ({"labels": {"role": "gateway"}, "profiles": ["generic-linux"]}, GW, False),
        ({"labels": {"role": "gateway"}, "profiles": ["gateway"], "devices": ["gw-1"]}, GW, True),
        ({"all": True}, SRV, True),
    ],
)
def test_selector_matches(raw: dict[str, Any], device: DeviceIdentity, matches: bool) -> None:
    assert parse_selector(raw, ("targets", 0)).matches(device) is matches


@pytest.mark.parametrize(
    ("raw", "where", "fragment"),
    [
        ({}, (), "at least one"),
        ({"labels": {}}, (), "matches every device"),
        ({"role": "gateway"}, ("role",), "unknown selector key"),
        ({"labels": ["role"]}, ("labels",), "mapping"),
        ({"labels": {"role": {"a": 1}}}, ("labels", "role"), "string or a non-empty list"),
        ({"labels": {"role": []}}, ("labels", "role"), "non-empty list"),
        ({"profiles": "gateway"}, ("profiles",), "list of strings"),
        ({"all": "yes"}, ("all",), "true or false"),
        ("role=gateway", (), "mapping"),
    ],
)
def test_bad_selectors(raw: Any, where: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_selector(raw, ("targets", 2))
    assert info.value.where == ("targets", 2, *where)
    assert fragment in info.value.reason


def test_bundle_targets_any_selector() -> None:
    b = parse_bundle("b", {"targets": [{"devices": ["srv-9"]}, {"labels": {"site": "berlin"}}]})
    assert b.targets_device(GW)
    assert b.targets_device(SRV)
    assert not b.targets_device(DeviceIdentity("x", {}, "gateway"))
    assert not parse_bundle("b", {"resources": []}).targets_device(GW)  # no targets: no device
    assert parse_bundle("b", {}).targets == ()


MOTD = b"""\
# bundles/motd/bundle.yaml
targets:
  - labels: {role: gateway}
resources:
  - kind: file
    path: /etc/motd
    content: "managed by edge-fleet\\n"
    mode: "0644"
  - kind: file
    path: /etc/chrony/chrony.conf
    source: files/chrony.conf
"""


def test_minimal_bundle_from_the_contract() -> None:
    b = parse_bundle("motd", load_yaml(MOTD, name="bundle.yaml").value)
    assert b.targets == (Selector(labels={"role": ("gateway",)}),)
    assert [r.id for r in b.resources] == ["file:/etc/motd", "file:/etc/chrony/chrony.conf"]
    motd = b.resources[0]
    assert isinstance(motd, File)
    assert motd.content == "managed by edge-fleet\n"
    assert motd.mode == 0o644


def test_bundle_problems_reports_every_problem() -> None:
    value = {
        "target": [],
        "targets": [{"labels": {"role": "gateway"}}, {"colour": "x"}],
        "resources": [
            {"kind": "file", "path": "/etc/a", "content": "a"},
            {"kind": "package", "name": "x"},
            {"kind": "file", "path": "/etc/a", "content": "b"},
            {"kind": "sysctl", "name": "vm.swappiness"},
        ],
        "health": [{"kind": "tcp", "port": 0}, {"kind": "memory"}],
        "values": {"ok": "1", "device_id": "x", "bad-name": "y", "frac": 1.5},
        "description": 3,
    }
    got = {(e.where, e.reason.split(" (")[0]) for e in parse_bundle_partial("b", value)[1]}
    assert got == {
        (("target",), "unknown top-level key 'target'"),
        (("description",), "'description' must be a string"),
        (("targets", 1, "colour"), "unknown selector key 'colour'"),
        (("resources", 1, "kind"), "unknown resource kind 'package'"),
        (("resources", 2), "duplicate resource id 'file:/etc/a'"),
        (("resources", 3, "value"), "'value' is required"),
        (("health", 0, "port"), "'port' must be at least 1"),
        (("values", "device_id"), "value name 'device_id' is reserved for the built-in device values"),
        (("values", "bad-name"), "value name 'bad-name' must be an identifier"),
        (("values", "frac"), "value 'frac' must be a string"),
    }
    with pytest.raises(BundleError) as info:
        parse_bundle("b", value)
    assert (info.value.where, info.value.reason.split(" (")[0]) in got


@pytest.mark.parametrize("value", [[], "x", None])
def test_bundle_must_be_a_mapping(value: Any) -> None:
    with pytest.raises(BundleError, match="must be a mapping"):
        parse_bundle("b", value)


def test_bad_bundle_name() -> None:
    assert any("invalid bundle name" in e.reason for e in parse_bundle_partial("../x", {})[1])


BASE: dict[str, Any] = {
    "targets": [{"all": True}],
    "values": {"port": "8080", "level": "info"},
    "resources": [
        {"kind": "file", "id": "conf", "path": "/etc/app/app.conf", "source": "files/app.conf",
         "template": True},
        {"kind": "file", "path": "/etc/app/ca.pem", "source": "files/ca.pem"},
        {"kind": "directory", "path": "/opt/app/cache", "mode": "0755"},
        {"kind": "sysctl", "name": "vm.swappiness", "value": "10"},
    ],
    "overlays": [
        {"match": {"labels": {"site": "berlin"}},
         "values": {"level": "debug"},
         "files": {"files/ca.pem": "files/ca-berlin.pem"},
         "resources": [{"kind": "directory", "path": "/opt/app/cache", "mode": "0700"},
                       {"id": "sysctl:vm.swappiness", "remove": True},
                       {"kind": "absent", "path": "/etc/app/legacy.conf"}]},
        {"match": {"labels": {"canary": "true"}},
         "values": {"level": "trace", "port": "9090"},
         "resources": [{"id": "conf", "mode": "0600"},
                       {"kind": "directory", "path": "/opt/app/cache", "mode": "0750"}]},
    ],
}


def _by_id(resources: Any) -> dict[str, Any]:
    return {r.id: r for r in resources}


def test_overlays_for_a_device_without_matches() -> None:
    rb = parse_bundle("app", BASE).resolve(SRV)
    assert rb.values == {"port": "8080", "level": "info"}
    assert rb.sources == {"files/app.conf": "files/app.conf", "files/ca.pem": "files/ca.pem"}
    assert [r.id for r in rb.resources] == ["conf", "file:/etc/app/ca.pem", "directory:/opt/app/cache",
                                            "sysctl:vm.swappiness"]


def test_overlay_value_payload_patch_remove_add() -> None:
    dev = DeviceIdentity("gw-2", {"site": "berlin"}, "gateway")
    rb = parse_bundle("app", BASE).resolve(dev)
    assert rb.values == {"port": "8080", "level": "debug"}
    assert rb.sources["files/ca.pem"] == "files/ca-berlin.pem"
    res = _by_id(rb.resources)
    assert res["directory:/opt/app/cache"].mode == 0o700
    assert "sysctl:vm.swappiness" not in res
    assert isinstance(res["absent:/etc/app/legacy.conf"], Absent)
    assert res["absent:/etc/app/legacy.conf"].bundle == "app"


def test_later_overlays_win() -> None:
    rb = parse_bundle("app", BASE).resolve(GW)  # matches both overlays, in order
    assert rb.values == {"port": "9090", "level": "trace"}
    res = _by_id(rb.resources)
    assert res["directory:/opt/app/cache"].mode == 0o750
    assert res["conf"].mode == 0o600
    assert res["conf"].source == "files/app.conf"
    assert res["conf"].template


@pytest.mark.parametrize(
    ("overlay", "where", "fragment"),
    [
        ({"values": {"a": "b"}}, ("overlays", 0), "needs 'match'"),
        ({"match": {"labels": {"x": "y"}}, "extra": 1}, ("overlays", 0, "extra"), "unknown overlay key"),
        ({"match": {"labels": {"x": "y"}}, "files": {"files/nope": "files/n2"}},
         ("overlays", 0, "files", "files/nope"), "no resource of the bundle uses"),
        ({"match": {"labels": {"x": "y"}}, "files": {"files/ca.pem": "../../etc/passwd"}},
         ("overlays", 0, "files", "files/ca.pem"), "escapes"),
        ({"match": {"labels": {"x": "y"}}, "resources": [{"mode": "0600"}]},
         ("overlays", 0, "resources", 0), "needs 'id'"),
        ({"match": {"labels": {"x": "y"}}, "resources": [{"id": "conf", "mode": "rwx"}]},
         ("overlays", 0, "resources", 0, "mode"), "octal"),
        ({"match": {"labels": {"x": "y"}}, "resources": [{"id": "conf", "kind": "directory"}]},
         ("overlays", 0, "resources", 0, "kind"), "cannot change the kind"),
        ({"match": {"labels": {"x": "y"}}, "resources": [{"id": "nope", "remove": True}]},
         ("overlays", 0, "resources", 0), "does not declare"),
        ({"match": {"labels": {"x": "y"}}, "resources": [{"id": "new-thing", "mode": "0600"}]},
         ("overlays", 0, "resources", 0, "kind"), "needs a known 'kind'"),
        ({"match": {"labels": {"x": "y"}}, "resources": [{"id": "conf", "content": "x"}]},
         ("overlays", 0, "resources", 0), "not both"),
        ({"match": {}}, ("overlays", 0, "match"), "at least one"),
    ],
)
def test_bad_overlays(overlay: dict[str, Any], where: tuple[str | int, ...], fragment: str) -> None:
    value = {**BASE, "overlays": [overlay]}
    problems = parse_bundle_partial("app", value)[1]
    assert [(e.where, fragment in e.reason) for e in problems] == [(where, True)], problems


def test_overlay_null_drops_a_field() -> None:
    value = {**BASE, "overlays": [{"match": {"all": True},
                                   "resources": [{"id": "conf", "source": None, "content": "x=${port}"}]}]}
    conf = _by_id(parse_bundle("app", value).resolve(SRV).resources)["conf"]
    assert conf.content == "x=${port}"
    assert conf.source is None
