"""edge_core.release.select: from a release tree to one device's desired state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_core.errors import BundleError, ConfinementError, DriverUnavailable
from edge_core.profiles import DeviceProfile, load_profile
from edge_core.release import DeviceIdentity, render_template, select
from edge_core.resources import DiskFreeCheck, File, SecretFile, SystemdActiveCheck

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "device_profiles"
EXAMPLE = ROOT / "examples" / "config-repo"

GATEWAY = load_profile("gateway", [SHIPPED])
GENERIC = load_profile("generic-linux", [SHIPPED])
GW = DeviceIdentity("gw-1", {"role": "gateway"}, "gateway")
GW_BERLIN = DeviceIdentity("gw-7", {"role": "gateway", "site": "berlin"}, "gateway")
SRV = DeviceIdentity("srv-1", {"role": "server"}, "generic-linux")


def example_tree() -> dict[str, bytes]:
    return {p.relative_to(EXAMPLE).as_posix(): p.read_bytes() for p in EXAMPLE.rglob("*") if p.is_file()}


def test_example_gateway() -> None:
    tree = example_tree()
    ds = select(tree, GW, GATEWAY)
    assert ds.bundles == ("gateway-app", "motd")
    ids = [r.id for r in ds.resources]
    assert ids[:2] == ["directory:/opt/gateway/data", "gateway-config"]
    assert ids[-2:] == ["file:/etc/motd", "file:/etc/chrony/chrony.conf"]
    assert ds.payloads["file:/etc/motd"] == b"managed by edge-fleet\n"
    assert ds.payloads["file:/etc/chrony/chrony.conf"] == tree["bundles/motd/files/chrony.conf"]
    conf = ds.payloads["gateway-config"].decode()
    assert "for gw-1." in conf
    assert "listen = 0.0.0.0:8443" in conf
    assert "url = https://ingest.example.com/v1" in conf
    assert "profile = gateway" in conf
    assert ds.payloads["file:/etc/edge-gateway/ca.pem"] == tree["bundles/gateway-app/files/ca.pem"]
    assert ds.payloads["systemd_unit:gateway-app.service"].startswith(b"[Unit]")
    assert "directory:/opt/gateway/data" not in ds.payloads
    active = SystemdActiveCheck(name="systemd_active", timeout=5.0, unit="gateway-app.service")
    assert ("gateway-app", active) in ds.checks
    assert ds.checks[-2:] == tuple(("profile:gateway", c) for c in GATEWAY.health)
    assert ds.fleet.poll_interval == 300
    assert ds.fleet.drift_interval == 60
    assert ds.fleet.rollout == {"plan": "default"}


def test_example_berlin_overlay_swaps_payload_and_value() -> None:
    tree = example_tree()
    ds = select(tree, GW_BERLIN, GATEWAY)
    assert ds.payloads["file:/etc/edge-gateway/ca.pem"] == tree["bundles/gateway-app/files/ca-berlin.pem"]
    assert "url = https://ingest-eu.example.com/v1" in ds.payloads["gateway-config"].decode()


def test_example_generic_host_gets_tools_only() -> None:
    ds = select(example_tree(), SRV, GENERIC)
    assert ds.bundles == ("tools",)
    assert [r.kind for r in ds.resources] == ["directory", "command"]
    assert ds.payloads == {}


def test_untargeted_device_gets_only_profile_checks() -> None:
    ds = select(example_tree(), DeviceIdentity("x", {}, "gateway"), GATEWAY)
    assert ds.bundles == ()
    assert ds.resources == ()
    assert [b for b, _ in ds.checks] == ["profile:gateway", "profile:gateway"]


def bundle(yaml_text: str, name: str = "b", files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    tree = {f"bundles/{name}/bundle.yaml": yaml_text.encode()}
    tree.update({f"bundles/{name}/{k}": v for k, v in (files or {}).items()})
    return tree


def test_template_builtins_and_labels() -> None:
    tree = bundle(
        "targets: [{all: true}]\nvalues: {greeting: hello}\nresources:\n"
        "  - {kind: file, path: /srv/a, template: true,"
        " content: '${greeting} ${device_id} ${device_profile} ${label_rack_zone} $$5'}\n"
    )
    dev = DeviceIdentity("d-1", {"rack.zone": "r7"}, "generic-linux")
    assert select(tree, dev, GENERIC).payloads["file:/srv/a"] == b"hello d-1 generic-linux r7 $5"


def test_template_from_source_file_and_no_template_left_alone() -> None:
    tree = bundle(
        "targets: [{all: true}]\nvalues: {port: '80'}\nresources:\n"
        "  - {kind: file, path: /srv/a, source: files/a.tmpl, template: true}\n"
        "  - {kind: file, path: /srv/b, source: files/a.tmpl}\n",
        files={"files/a.tmpl": b"port=${port}\n"},
    )
    ds = select(tree, SRV, GENERIC)
    assert ds.payloads["file:/srv/a"] == b"port=80\n"
    assert ds.payloads["file:/srv/b"] == b"port=${port}\n"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("${nope}", "unknown value ${nope}"), ("${label_site}", "unknown value ${label_site}"),
     ("cost: $5", "invalid placeholder")],
)
def test_template_errors(content: str, fragment: str) -> None:
    tree = bundle(f"targets: [{{all: true}}]\nresources:\n  - {{kind: file, path: /srv/a, template: true, "
                  f"content: '{content}'}}\n")
    with pytest.raises(BundleError) as info:
        select(tree, SRV, GENERIC)
    assert fragment in str(info.value)
    assert "bundles/b/bundle.yaml" in str(info.value)


def test_render_template_direct() -> None:
    assert render_template("a=${a} $b $$", {"a": "1", "b": "2"}) == "a=1 2 $"


@pytest.mark.parametrize(
    "resource",
    [
        "{kind: file, path: /etc/passwd, content: x}",
        "{kind: file, path: /etc/motd.d/x, content: x}",
        "{kind: directory, path: /root/.ssh}",
        "{kind: symlink, path: /usr/bin/sh, target: /opt/gateway/sh}",
        "{kind: systemd_unit, name: x.service, content: x, unit_dir: /lib/systemd/system}",
        "{kind: file, path: /etc/systemd/system/edge-agent.service, content: x}",
    ],
)
def test_confinement_escapes_refused(resource: str) -> None:
    tree = bundle(f"targets: [{{all: true}}]\nresources:\n  - {resource}\n")
    with pytest.raises(ConfinementError):
        select(tree, GW, GATEWAY)


def test_denied_roots_of_generic_profile() -> None:
    tree = bundle("targets: [{all: true}]\nresources:\n  - {kind: file, path: /etc/edge-agent/agent.yaml, "
                  "content: x}\n")
    with pytest.raises(ConfinementError, match="denies"):
        select(tree, SRV, GENERIC)


def test_disallowed_kind_refused() -> None:
    tree = bundle("targets: [{all: true}]\nresources:\n  - {kind: command, name: x, run: [/bin/true]}\n")
    with pytest.raises(DriverUnavailable, match="'command' is not allowed by device profile 'gateway'"):
        select(tree, GW, GATEWAY)
    assert select(tree, SRV, GENERIC).resources[0].kind == "command"


def test_duplicate_id_across_bundles_refused() -> None:
    tree = {**bundle("targets: [{all: true}]\nresources: [{kind: file, path: /srv/x, content: a}]\n", "a"),
            **bundle("targets: [{all: true}]\nresources: [{kind: file, path: /srv/x, content: b}]\n", "b")}
    with pytest.raises(BundleError, match="declared by bundles 'a' and 'b'"):
        select(tree, SRV, GENERIC)
    # Not a problem for a device only one of them targets.
    tree["bundles/b/bundle.yaml"] = (b"targets: [{devices: [other]}]\n"
                                     b"resources: [{kind: file, path: /srv/x, content: b}]\n")
    assert select(tree, SRV, GENERIC).bundles == ("a",)


def test_broken_bundle_anywhere_refuses_the_release() -> None:
    tree = {**bundle("targets: [{all: true}]\nresources: [{kind: file, path: /srv/x, content: a}]\n", "a"),
            **bundle("targets: [{devices: [nobody]}]\nresources: [{kind: nope}]\n", "z")}
    with pytest.raises(BundleError, match=r"bundles/z/bundle.yaml: resources.0.kind: unknown resource kind"):
        select(tree, SRV, GENERIC)


def test_broken_fleet_file_refuses() -> None:
    tree = {**bundle("targets: [{all: true}]\n"), "fleet.yaml": b"reconcile: {poll_interval: soon}\n"}
    with pytest.raises(BundleError, match=r"fleet\.yaml: reconcile\.poll_interval"):
        select(tree, SRV, GENERIC)


def test_missing_payload_refused() -> None:
    tree = bundle("targets: [{all: true}]\nresources: [{kind: file, path: /srv/x, source: files/x}]\n")
    with pytest.raises(BundleError, match="payload bundles/b/files/x is not in the release"):
        select(tree, SRV, GENERIC)


def test_watch_must_name_a_received_resource() -> None:
    tree = bundle("targets: [{all: true}]\nresources:\n  - {kind: systemd_unit, name: a.service, "
                  "running: true, watch: [file:/srv/conf]}\n")
    with pytest.raises(BundleError, match="watches 'file:/srv/conf'"):
        select(tree, SRV, GENERIC)
    tree["bundles/b/bundle.yaml"] += b"  - {kind: file, path: /srv/conf, content: x}\n"
    assert len(select(tree, SRV, GENERIC).resources) == 2


def test_secret_file_payload_is_the_sealed_bytes() -> None:
    sealed = json.dumps({"type": "edge-fleet/sealed-secret", "version": 1, "ciphertext": "AAAA"}).encode()
    tree = {**bundle("targets: [{all: true}]\nresources:\n  - {kind: secret_file, path: /etc/gateway/token, "
                     "secret: secrets/token.sealed.json}\n"),
            "secrets/token.sealed.json": sealed}
    profile = DeviceProfile(name="p", allowed_roots=("/etc/gateway",), drivers=frozenset({"secret_file"}),
                            health=(DiskFreeCheck(name="d"),))
    ds = select(tree, DeviceIdentity("d", {}, "p"), profile)
    res = ds.resources[0]
    assert isinstance(res, SecretFile)
    assert res.mode == 0o600
    assert ds.payloads[res.id] == sealed
    assert ds.checks == (("profile:p", DiskFreeCheck(name="d")),)
    del tree["secrets/token.sealed.json"]
    with pytest.raises(BundleError, match=r"sealed secret secrets/token\.sealed\.json is not in the release"):
        select(tree, DeviceIdentity("d", {}, "p"), profile)


def test_overlay_applies_only_to_matching_devices_and_resource_order() -> None:
    tree = bundle(
        "targets: [{all: true}]\nresources:\n"
        "  - {kind: file, path: /srv/a, content: a}\n"
        "  - {kind: file, path: /srv/b, source: files/b}\n"
        "overlays:\n"
        "  - match: {labels: {role: server}}\n"
        "    files: {files/b: files/b-server}\n"
        "    resources: [{kind: file, path: /srv/a, content: a2}, {kind: directory, path: /srv/c}]\n",
        files={"files/b": b"base", "files/b-server": b"server"},
    )
    ds = select(tree, SRV, GENERIC)
    assert [r.id for r in ds.resources] == ["file:/srv/a", "file:/srv/b", "directory:/srv/c"]
    assert ds.payloads["file:/srv/a"] == b"a2"
    assert ds.payloads["file:/srv/b"] == b"server"
    other = select(tree, DeviceIdentity("o", {}, "generic-linux"), GENERIC)
    assert other.payloads == {"file:/srv/a": b"a", "file:/srv/b": b"base"}
    assert isinstance(other.resources[0], File)
