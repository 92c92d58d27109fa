"""``fleetctl release diff``: two signed releases of a real operator repository compared per device
group through the device's own selection, with no device and no server for an explicit group."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from fleet_server import fleetctl
from fleet_server.cli.release_diff import Group, groups_of
from tests.support.agent_fleet import PROFILE, AgentFleet, base_release, bundle


def diff(fleet: AgentFleet, capsys: pytest.CaptureFixture[str], old: str, new: str,
         *group: str) -> tuple[int, dict[str, Any] | str]:
    capsys.readouterr()
    code = fleetctl.main(["release", "diff", old, new, "--repo", str(fleet.work.path),
                          "--profiles", str(fleet.tmp / "profiles"), *group, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def test_a_diff_lists_what_each_group_gets_added_changed_and_removed(
        fleet: AgentFleet, capsys: pytest.CaptureFixture[str]) -> None:
    first = fleet.publish(base_release(fleet.root))
    files = base_release(fleet.root)
    files["bundles/app/files/app.conf"] = "listen = 9443\n"
    doc = yaml.safe_load(files["bundles/app/bundle.yaml"])
    doc["resources"] = [r for r in doc["resources"] if r.get("path") != "/etc/motd"]
    doc["resources"].append({"kind": "file", "path": "/etc/app/extra.conf", "content": "x = 1\n"})
    files["bundles/app/bundle.yaml"] = bundle(doc["resources"], doc.get("health"))
    second = fleet.publish(files)
    code, got = diff(fleet, capsys, first, second, "--profile", "test-device", "--label", "role=gateway")
    assert code == 0, got
    assert isinstance(got, dict)
    assert (got["old"], got["new"]) == (first, second)
    [group] = got["groups"]
    assert group["group"] == "profile test-device, role=gateway"
    assert (group["added"], group["changed"], group["removed"]) == (
        ["file:/etc/app/extra.conf"], ["app-config"], ["file:/etc/motd"])
    assert group["refused"] is None
    # a group no bundle targets gets nothing either way
    code, got = diff(fleet, capsys, first, second, "--profile", "test-device", "--label", "role=camera")
    assert isinstance(got, dict)
    assert (got["groups"][0]["added"], got["groups"][0]["removed"]) == ([], [])
    # the same releases, in text
    capsys.readouterr()
    assert fleetctl.main(["release", "diff", first, second, "--repo", str(fleet.work.path),
                          "--profiles", str(fleet.tmp / "profiles"), "--profile", "test-device",
                          "--label", "role=gateway"]) == 0
    text = capsys.readouterr().out
    assert "  + file:/etc/app/extra.conf\n  ~ app-config\n  - file:/etc/motd\n" in text


def test_a_release_the_profile_refuses_is_reported_as_refused(fleet: AgentFleet,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    first = fleet.publish(base_release(fleet.root))
    strict = {**PROFILE, "name": "strict", "drivers": ["file", "directory", "symlink", "absent"]}
    (fleet.tmp / "profiles" / "strict.yaml").write_text(yaml.safe_dump(strict))
    code, got = diff(fleet, capsys, first, first, "--profile", "strict", "--label", "role=gateway")
    assert isinstance(got, dict)
    [group] = got["groups"]
    assert "command" in str(group["refused"])
    code, got = diff(fleet, capsys, first, first, "--profile", "nowhere")
    assert isinstance(got, dict)
    assert got["groups"][0]["refused"] == "profile nowhere is not among the profiles read"
    code, err = diff(fleet, capsys, "no-such-rev", first, "--profile", "test-device")
    assert code == 1
    assert "no commit 'no-such-rev'" in str(err)


def test_devices_are_grouped_by_profile_and_labels() -> None:
    rows = [{"id": "b", "profile": "rpi4", "labels": {"site": "x"}},
            {"id": "a", "profile": "rpi4", "labels": {"site": "x"}},
            {"id": "c", "profile": "gw", "labels": None}]
    assert groups_of(rows) == [Group("rpi4", (("site", "x"),), 2, "a"), Group("gw", (), 1, "c")]
    assert groups_of(rows)[1].name() == "profile gw, no labels"
    assert Group("", (), 0, "d").name() == "profile -, no labels"
