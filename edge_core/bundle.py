"""The ``bundle.yaml`` format: targets, resources, health checks, template values and overlays.

Pure: it takes the already-loaded YAML value of one bundle and returns frozen dataclasses, or
:class:`BundleError` with the location (``where``) of the problem inside the document.
:func:`collect_bundle` collects *every* problem (for ``fleetctl lint``); :func:`parse_bundle`
raises the first one. Resolving overlays for one device is :meth:`Bundle.resolve`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_core.errors import BundleError, PathError
from edge_core.paths import validate_repo_path
from edge_core.resources import (
    RESOURCE_KINDS,
    File,
    HealthCheck,
    Resource,
    SystemdUnit,
    parse_check,
    parse_resource,
)

__all__ = [
    "BUILTIN_VALUES",
    "BUNDLE_NAME",
    "Bundle",
    "DeviceIdentity",
    "Overlay",
    "ResolvedBundle",
    "ResourcePatch",
    "Selector",
    "apply_one_overlay",
    "builtin_values",
    "collect_bundle",
    "default_resource_id",
    "parse_bundle",
    "parse_selector",
]

Where = tuple[str | int, ...]

BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
BUILTIN_VALUES = ("device_id", "device_profile")
_VALUE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP_KEYS = frozenset({"description", "targets", "resources", "health", "values", "overlays"})
_SELECTOR_KEYS = frozenset({"labels", "profiles", "devices", "all"})
_OVERLAY_KEYS = frozenset({"match", "values", "files", "resources"})
# The field that names a resource when it has no explicit id: "<kind>:<that field>".
_KEY_FIELD = {"file": "path", "directory": "path", "symlink": "path", "absent": "path",
              "secret_file": "path", "systemd_unit": "name", "sysctl": "name", "command": "name"}


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a device is, as far as targeting goes: its id, labels and profile name."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: str = ""


@dataclass(frozen=True)
class Selector:
    """One entry of ``targets`` (or an overlay's ``match``): every key given must match.

    ``labels`` maps a label to the values any of which matches; ``all`` matches every device.
    """

    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    all: bool = False

    def matches(self, device: DeviceIdentity) -> bool:
        """Tell whether ``device`` satisfies every key of this selector."""
        for key, wanted in self.labels.items():
            if device.labels.get(key) not in wanted:
                return False
        if self.profiles and device.profile not in self.profiles:
            return False
        return not (self.devices and device.id not in self.devices)


@dataclass(frozen=True)
class ResourcePatch:
    """One entry of an overlay's ``resources``: fields merged over the resource with ``id``."""

    id: str
    fields: Mapping[str, Any]
    remove: bool = False


@dataclass(frozen=True)
class Overlay:
    """Changes applied, in order, for devices matching ``match``."""

    match: Selector
    values: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    resources: tuple[ResourcePatch, ...] = ()


@dataclass(frozen=True)
class ResolvedBundle:
    """A bundle with the overlays matching one device applied.

    ``sources`` maps each ``source:`` path used by a resource to the bundle-relative payload
    file to read (different when an overlay's ``files`` swapped it).
    """

    name: str
    resources: tuple[Resource, ...]
    values: Mapping[str, str]
    sources: Mapping[str, str]


@dataclass(frozen=True)
class Bundle:
    """One parsed ``bundles/<name>/bundle.yaml``."""

    name: str
    targets: tuple[Selector, ...]
    resources: tuple[Resource, ...]
    health: tuple[HealthCheck, ...]
    values: Mapping[str, str]
    overlays: tuple[Overlay, ...]
    raw: Mapping[str, Any]
    description: str = ""

    def targets_device(self, device: DeviceIdentity) -> bool:
        """Tell whether any selector of ``targets`` matches ``device`` (none: no device)."""
        return any(s.matches(device) for s in self.targets)

    def resolve(self, device: DeviceIdentity) -> ResolvedBundle:
        """Apply, in order, every overlay whose ``match`` selects ``device``.

        Raises:
            BundleError: a patched or added resource is invalid once merged.
        """
        chosen = [(i, o) for i, o in enumerate(self.overlays) if o.match.matches(device)]
        return _apply_overlays(self, chosen)


def apply_one_overlay(bundle: Bundle, index: int) -> ResolvedBundle:
    """Apply only overlay ``index`` of ``bundle`` to its base (how lint checks each overlay).

    Raises:
        BundleError: a patched or added resource is invalid once merged.
    """
    return _apply_overlays(bundle, [(index, bundle.overlays[index])])


def default_resource_id(raw: Mapping[str, Any]) -> str | None:
    """Return the id a resource mapping has (explicit ``id`` or ``kind:path``/``kind:name``)."""
    rid = raw.get("id")
    if isinstance(rid, str):
        return rid
    kind = raw.get("kind")
    key_field = _KEY_FIELD.get(kind) if isinstance(kind, str) else None
    key = raw.get(key_field) if key_field else None
    return f"{kind}:{key}" if isinstance(key, str) else None


def builtin_values(device: DeviceIdentity) -> dict[str, str]:
    """Return the template values every device provides: ``device_id``, ``device_profile``, labels.

    A label ``site.example/zone`` is ``label_site_example_zone``: every character outside
    ``[A-Za-z0-9_]`` becomes ``_``.
    """
    out = {"device_id": device.id, "device_profile": device.profile}
    for key, value in device.labels.items():
        out["label_" + re.sub(r"[^A-Za-z0-9_]", "_", key)] = value
    return out


# --- parsing -----------------------------------------------------------------------------------


class _Collector:
    def __init__(self) -> None:
        self.problems: list[BundleError] = []

    def add(self, reason: str, where: Where) -> None:
        self.problems.append(BundleError(reason, where))


def _label_value(v: object) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int):
        return str(v)
    return None


def parse_selector(raw: object, where: Where) -> Selector:
    """Validate one selector mapping (``labels``, ``profiles``, ``devices``, ``all``).

    Raises:
        BundleError: not a mapping, unknown or empty key set, wrong types.
    """
    if not isinstance(raw, Mapping):
        raise BundleError("a selector must be a mapping", where)
    unknown = sorted(str(k) for k in raw if k not in _SELECTOR_KEYS)
    if unknown:
        raise BundleError(f"unknown selector key {unknown[0]!r} (known: all, devices, labels, profiles)",
                          (*where, unknown[0]))
    if not raw:
        raise BundleError("a selector needs at least one of labels, profiles, devices or all: true", where)
    labels: dict[str, tuple[str, ...]] = {}
    raw_labels = raw.get("labels", {})
    if not isinstance(raw_labels, Mapping):
        raise BundleError("'labels' must be a mapping of label to value(s)", (*where, "labels"))
    for k, v in raw_labels.items():
        at = (*where, "labels", str(k))
        if not isinstance(k, str) or not k:
            raise BundleError("label names must be strings", at)
        values = v if isinstance(v, list) else [v]
        texts = [_label_value(x) for x in values]
        if not values or any(t is None for t in texts):
            raise BundleError(f"label {k!r} must be a string or a non-empty list of strings", at)
        labels[k] = tuple(t for t in texts if t is not None)
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("profiles", "devices"):
        v = raw.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise BundleError(f"{key!r} must be a list of strings", (*where, key))
        lists[key] = tuple(v)
    everything = raw.get("all", False)
    if not isinstance(everything, bool):
        raise BundleError("'all' must be true or false", (*where, "all"))
    if not (labels or lists["profiles"] or lists["devices"] or everything):
        raise BundleError("this selector matches every device; write 'all: true' to mean that", where)
    return Selector(labels=labels, profiles=lists["profiles"], devices=lists["devices"], all=everything)


def _values(raw: object, where: Where, out: _Collector) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        out.add("'values' must be a mapping of name to string", where)
        return {}
    values: dict[str, str] = {}
    for k, v in raw.items():
        at = (*where, str(k))
        if not isinstance(k, str) or not _VALUE_NAME.match(k):
            out.add(f"value name {k!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)", at)
            continue
        if k in BUILTIN_VALUES or k.startswith("label_"):
            out.add(f"value name {k!r} is reserved for the built-in device values", at)
            continue
        text = _label_value(v)
        if text is None:
            out.add(f"value {k!r} must be a string (quote numbers with a fraction)", at)
            continue
        values[k] = text
    return values


def _sources_used(resources: tuple[Resource, ...]) -> set[str]:
    return {r.source for r in resources if isinstance(r, File | SystemdUnit) and r.source is not None}


def _overlay(raw: object, where: Where, base: tuple[Resource, ...], out: _Collector) -> Overlay | None:
    if not isinstance(raw, Mapping):
        out.add("an overlay must be a mapping", where)
        return None
    unknown = sorted(str(k) for k in raw if k not in _OVERLAY_KEYS)
    for k in unknown:
        out.add(f"unknown overlay key {k!r} (known: files, match, resources, values)", (*where, k))
    if "match" not in raw:
        out.add("an overlay needs 'match' (a selector)", where)
        return None
    try:
        match = parse_selector(raw["match"], (*where, "match"))
    except BundleError as exc:
        out.problems.append(exc)
        return None
    values = _values(raw.get("values"), (*where, "values"), out)
    files: dict[str, str] = {}
    raw_files = raw.get("files") or {}
    if not isinstance(raw_files, Mapping):
        out.add("'files' must map a base source path to its replacement", (*where, "files"))
        raw_files = {}
    used = _sources_used(base)
    for k, v in raw_files.items():
        at = (*where, "files", str(k))
        try:
            validate_repo_path(k)
            validate_repo_path(v)
        except PathError as exc:
            out.add(str(exc), at)
            continue
        if k not in used:
            out.add(f"overlay replaces {k!r}, which no resource of the bundle uses as 'source'", at)
            continue
        files[str(k)] = str(v)
    patches: list[ResourcePatch] = []
    raw_res = raw.get("resources") or []
    if not isinstance(raw_res, list):
        out.add("'resources' must be a list of resource patches", (*where, "resources"))
        raw_res = []
    for i, p in enumerate(raw_res):
        at = (*where, "resources", i)
        if not isinstance(p, Mapping):
            out.add("a resource patch must be a mapping", at)
            continue
        rid = default_resource_id(p)
        if rid is None:
            out.add("a resource patch needs 'id' (or 'kind' with its 'path'/'name')", at)
            continue
        remove = p.get("remove", False)
        if not isinstance(remove, bool):
            out.add("'remove' must be true or false", (*at, "remove"))
            continue
        fields = {k: v for k, v in p.items() if k != "remove"}
        patches.append(ResourcePatch(id=rid, fields=fields, remove=remove))
    return Overlay(match=match, values=values, files=files, resources=tuple(patches))


def _resources(raw: object, name: str, out: _Collector) -> tuple[tuple[Resource, ...], list[Any]]:
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        out.add("'resources' must be a list", ("resources",))
        return (), []
    parsed: list[Resource] = []
    raws: list[Any] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(raw):
        try:
            res = parse_resource(r, name, ("resources", i))
        except BundleError as exc:
            out.problems.append(exc)
            continue
        if res.id in seen:
            out.add(f"duplicate resource id {res.id!r} (also resources.{seen[res.id]})", ("resources", i))
            continue
        seen[res.id] = i
        parsed.append(res)
        raws.append(r)
    return tuple(parsed), raws


def parse_bundle(name: str, value: object) -> Bundle:
    """Parse the loaded YAML ``value`` of ``bundles/<name>/bundle.yaml``.

    Raises:
        BundleError: the first problem :func:`collect_bundle` finds, with ``where``.
    """
    bundle, problems = collect_bundle(name, value)
    if problems:
        raise problems[0]
    assert bundle is not None
    return bundle


def collect_bundle(name: str, value: object) -> tuple[Bundle | None, list[BundleError]]:
    """Parse ``value`` checking each resource, health check, selector and overlay on its own.

    Returns the bundle built from the parts that are valid (None only when ``value`` is not a
    mapping) and every problem, so one mistake does not hide the next; overlays are checked by
    applying each one alone to the base. :func:`parse_bundle` raises the first problem;
    ``fleetctl lint`` reports them all.
    """
    out = _Collector()
    if not BUNDLE_NAME.match(name):
        out.add(f"invalid bundle name {name!r} (letters, digits, '.', '_', '-'; at most 64)", ())
    if not isinstance(value, Mapping):
        out.add("bundle.yaml must be a mapping", ())
        return None, out.problems
    for k in sorted(str(k) for k in value if k not in _TOP_KEYS):
        out.add(f"unknown top-level key {k!r} (known: {', '.join(sorted(_TOP_KEYS))})", (k,))
    description = value.get("description", "")
    if not isinstance(description, str):
        out.add("'description' must be a string", ("description",))
        description = ""
    targets: list[Selector] = []
    raw_targets = value.get("targets") or []
    if not isinstance(raw_targets, list):
        out.add("'targets' must be a list of selectors", ("targets",))
        raw_targets = []
    for i, t in enumerate(raw_targets):
        try:
            targets.append(parse_selector(t, ("targets", i)))
        except BundleError as exc:
            out.problems.append(exc)
    resources, _raws = _resources(value.get("resources"), name, out)
    health: list[HealthCheck] = []
    raw_health = value.get("health") or []
    if not isinstance(raw_health, list):
        out.add("'health' must be a list of health checks", ("health",))
        raw_health = []
    for i, h in enumerate(raw_health):
        try:
            health.append(parse_check(h, ("health", i)))
        except BundleError as exc:
            out.problems.append(exc)
    values = _values(value.get("values"), ("values",), out)
    overlays: list[Overlay] = []
    raw_overlays = value.get("overlays") or []
    if not isinstance(raw_overlays, list):
        out.add("'overlays' must be a list", ("overlays",))
        raw_overlays = []
    for i, o in enumerate(raw_overlays):
        ov = _overlay(o, ("overlays", i), resources, out)
        if ov is not None:
            overlays.append(ov)
    bundle = Bundle(name=name, targets=tuple(targets), resources=resources, health=tuple(health),
                    values=values, overlays=tuple(overlays), raw=value, description=description)
    if not out.problems:
        for i, ov in enumerate(bundle.overlays):
            try:
                _apply_overlays(bundle, [(i, ov)])
            except BundleError as exc:
                out.problems.append(exc)
    return bundle, out.problems


def _apply_overlays(bundle: Bundle, chosen: list[tuple[int, Overlay]]) -> ResolvedBundle:
    raw_list = bundle.raw.get("resources") or []
    entries: dict[str, tuple[dict[str, Any], Where]] = {}
    parsed: dict[str, Resource] = {}
    for res in bundle.resources:
        parsed.setdefault(res.id, res)
    patched: set[str] = set()  # ids an overlay changed or added: parsed again below
    for i, r in enumerate(raw_list):  # only what parsed (lint applies overlays to partial bundles)
        rid = default_resource_id(r) if isinstance(r, Mapping) else None
        if rid is not None and rid in parsed and rid not in entries:
            entries[rid] = (dict(r), ("resources", i))
    values = dict(bundle.values)
    sources = {s: s for s in _sources_used(bundle.resources)}
    for index, ov in chosen:
        values.update(ov.values)
        sources.update(ov.files)
        for j, patch in enumerate(ov.resources):
            at: Where = ("overlays", index, "resources", j)
            patched.add(patch.id)
            if patch.remove:
                if patch.id not in entries:
                    raise BundleError(f"overlay removes {patch.id!r}, which the bundle does not declare", at)
                del entries[patch.id]
                continue
            if patch.id in entries:
                base, _ = entries[patch.id]
                kind = patch.fields.get("kind")
                if kind is not None and kind != base.get("kind"):
                    raise BundleError(f"an overlay cannot change the kind of {patch.id!r}", (*at, "kind"))
                merged = {**base, **patch.fields}
                if "id" in base and "id" not in patch.fields:
                    merged["id"] = base["id"]
                entries[patch.id] = ({k: v for k, v in merged.items() if v is not None}, at)
            else:
                entries[patch.id] = (dict(patch.fields), at)
    resolved: list[Resource] = []
    for rid, (raw, at) in entries.items():
        if rid not in patched:  # as the bundle declared it: already parsed from this very entry
            resolved.append(parsed[rid])
            continue
        if raw.get("kind") not in RESOURCE_KINDS:
            raise BundleError(f"overlay resource {rid!r} needs a known 'kind'", (*at, "kind"))
        res = parse_resource(raw, bundle.name, at)
        if res.id != rid:
            raise BundleError(f"overlay patch for {rid!r} changes its id to {res.id!r}", at)
        resolved.append(res)
    for s in _sources_used(tuple(resolved)):
        sources.setdefault(s, s)
    return ResolvedBundle(name=bundle.name, resources=tuple(resolved), values=values, sources=sources)
