"""``fleetctl release diff A B``: what changes between two releases for each group of devices, without
any device.

A and B are revisions of the operator's repository (a commit, tag or branch; B defaults to HEAD).
A device group is one combination of profile and labels: the ones the fleet server knows (every
device of ``GET /api/v1/devices``, counted per group), or the one given with ``--profile`` and
``--label``. For each group both releases go through the device's own selection
(:func:`edge_core.release.select`: targets, overlays, payloads, the profile enforced), and the
resources are compared by id: added, removed, and changed (the declaration or the bytes to write). A
release the group's profile refuses is reported with the refusal instead. Templated payloads are
rendered with the group's first device id (``--device`` names one when no server is asked).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_core.bundle import DeviceIdentity
from edge_core.errors import EdgeFleetError
from edge_core.profiles import DeviceProfile
from edge_core.release import DesiredState, select
from edge_core.source import Source
from fleet_server.authoring.problems import load_all_profiles
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, print_json, server_options
from fleet_server.cli.lint import default_profile_dirs
from fleet_server.cli.release_export import resolve_commit
from fleet_server.errors import UsageError

__all__ = ["Group", "add_diff", "diff_releases", "groups_of"]

_EXAMPLES = """examples:
  fleetctl release diff v6 v7 --repo ./fleet-repo                # per device group the server knows
  fleetctl release diff HEAD~1 --repo ./fleet-repo --profile rpi4 --label site=berlin --label ring=canary
  fleetctl release diff v6 v7 --repo ./fleet-repo --json | jq '.groups[] | select(.changed | length > 0)'
"""


@dataclass(frozen=True)
class Group:
    """Devices that select the same: one profile and one set of labels (``first`` names one of them)."""

    profile: str
    labels: tuple[tuple[str, str], ...]
    devices: int
    first: str

    def name(self) -> str:
        """``profile rpi4, site=berlin,ring=canary``."""
        labels = ",".join(f"{k}={v}" for k, v in self.labels) or "no labels"
        return f"profile {self.profile or '-'}, {labels}"


def groups_of(devices: Sequence[Mapping[str, Any]]) -> list[Group]:
    """Group device rows (``id``, ``profile``, ``labels``) by profile and labels, largest group first."""
    count: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}
    for d in devices:
        raw = d.get("labels")
        labels: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        key = (str(d.get("profile") or ""), tuple(sorted((str(k), str(v)) for k, v in labels.items())))
        count.setdefault(key, []).append(str(d.get("id")))
    groups = [Group(p, labels, len(ids), min(ids)) for (p, labels), ids in count.items()]
    return sorted(groups, key=lambda g: (-g.devices, g.profile, g.labels))


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _selection(tree: Mapping[str, bytes], group: Group,
               profile: DeviceProfile) -> tuple[dict[str, tuple[Any, str | None]] | None, str | None]:
    """``(resource id -> (declaration, payload digest), None)``, or ``(None, refusal)``."""
    device = DeviceIdentity(group.first, dict(group.labels), group.profile)
    try:
        desired: DesiredState = select(tree, device, profile)
    except EdgeFleetError as exc:
        return None, str(exc)
    return {r.id: (r, _digest(desired.payloads.get(r.id))) for r in desired.resources}, None


def diff_releases(old: Mapping[str, bytes], new: Mapping[str, bytes], groups: Sequence[Group],
                  profiles: Mapping[str, DeviceProfile]) -> list[dict[str, Any]]:
    """Compare the two release trees for every group; one entry per group (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for group in groups:
        entry: dict[str, Any] = {"group": group.name(), "profile": group.profile,
                                 "labels": dict(group.labels), "devices": group.devices, "added": [],
                                 "removed": [], "changed": [], "refused": None, "refused_before": None}
        profile = profiles.get(group.profile)
        if profile is None:
            entry["refused"] = f"profile {group.profile or '(none)'} is not among the profiles read"
            out.append(entry)
            continue
        before, entry["refused_before"] = _selection(old, group, profile)
        after, entry["refused"] = _selection(new, group, profile)
        if after is not None:
            base = before or {}
            entry["added"] = sorted(set(after) - set(base))
            entry["removed"] = sorted(set(base) - set(after))
            entry["changed"] = sorted(r for r in set(after) & set(base) if after[r] != base[r])
        out.append(entry)
    return out


def _tree(source: Source, repo: Path, rev: str) -> tuple[str, Mapping[str, bytes]]:
    commit = resolve_commit(repo, rev)
    source.fetch(commit)
    return commit, source.read_tree(commit)


def _server_groups(args: argparse.Namespace) -> list[Group]:
    from fleet_server.cli.devices import api_get, client_of  # noqa: PLC0415 - registers this module

    client = client_of(args)
    rows: list[Mapping[str, Any]] = []
    while True:
        page = api_get(client.server, "/api/v1/devices", [("limit", "1000"), ("offset", str(len(rows)))],
                       token=client.token, timeout=args.http_timeout)
        devices = page.get("devices") if isinstance(page, dict) else None
        if not isinstance(devices, list):
            raise UsageError("fleet server answered an unexpected document for /api/v1/devices")
        rows += devices
        if len(devices) < 1000:
            return groups_of(rows)


def _render(entries: Sequence[Mapping[str, Any]], old: str, new: str) -> str:
    lines = [f"release diff {old[:12]} -> {new[:12]}"]
    for e in entries:
        lines.append(f"{e['group']} ({e['devices']} device(s)):")
        if e["refused"]:
            lines.append(f"  refused: {e['refused']}")
            continue
        if e["refused_before"]:
            lines.append(f"  (the old release was refused: {e['refused_before']})")
        if not (e["added"] or e["removed"] or e["changed"]):
            lines.append("  no change")
        lines += [f"  + {r}" for r in e["added"]] + [f"  ~ {r}" for r in e["changed"]]
        lines += [f"  - {r}" for r in e["removed"]]
    return "\n".join(lines) + "\n"


def _run_diff(args: argparse.Namespace) -> int:
    if args.label and not args.profile:
        raise UsageError("--label needs --profile (a group is one profile and its labels)")
    if args.profile:
        labels: dict[str, str] = {}
        for raw in args.label or []:
            key, sep, value = raw.partition("=")
            if not sep or not key:
                raise UsageError(f"--label must be KEY=VALUE, got {raw!r}")
            labels[key] = value
        groups = [Group(args.profile, tuple(sorted(labels.items())), 1, args.device)]
    else:
        groups = _server_groups(args)
    profiles = load_all_profiles(args.profiles or default_profile_dirs())
    with tempfile.TemporaryDirectory(prefix="fleetctl-diff-") as cache, \
            Source(str(args.repo.resolve()), "main", Path(cache) / "repo") as source:
        old_commit, old = _tree(source, args.repo, args.old)
        new_commit, new = _tree(source, args.repo, args.new)
    entries = diff_releases(old, new, groups, profiles)
    if args.json:
        print_json({"old": old_commit, "new": new_commit, "groups": entries})
    else:
        sys.stdout.write(_render(entries, old_commit, new_commit))
    return 0


def add_diff(sub: Any) -> None:
    """Add ``fleetctl release diff`` to the ``release`` sub-commands."""
    diff = sub.add_parser(
        "diff", help="what changes between two releases, per device group, without any device",
        parents=[server_options()],
        description="Compare two revisions of the operator repository as each group of devices would "
                    "receive them (bundle targets, overlays, payloads, profile): resources added (+), "
                    "changed (~) and removed (-), or the refusal. The groups are the profile and label "
                    "combinations of the devices the fleet server knows, or the one --profile/--label "
                    "name. Changes nothing anywhere.",
        epilog=_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    diff.add_argument("old", metavar="A", help="the release before (a commit, tag or branch)")
    diff.add_argument("new", metavar="B", nargs="?", default="HEAD", help="the release after (default HEAD)")
    diff.add_argument("--repo", type=Path, default=Path("."), metavar="DIR",
                      help="the operator repository (default: the current directory)")
    diff.add_argument("--profile", metavar="NAME",
                      help="one group: devices of this profile (no server asked)")
    diff.add_argument("--label", action="append", metavar="KEY=VALUE", help="with --profile: a label of "
                      "the group (repeatable)")
    diff.add_argument("--device", default="device", metavar="ID",
                      help="with --profile: the device id templates are rendered with (default: device)")
    diff.add_argument("--profiles", type=Path, action="append", metavar="DIR",
                      help="where device profiles are read (repeatable; default: as fleetctl lint)")
    add_json_option(diff, "print a JSON object")
    diff.set_defaults(func=_run_diff)
