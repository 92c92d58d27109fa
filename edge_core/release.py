"""From a verified release tree to what one device must look like (pure: no I/O).

:func:`select` parses ``fleet.yaml`` and *every* bundle of the tree: a release is signed and
applied as a whole, so a broken bundle anywhere refuses the release on every device rather than
leaving devices to disagree about which half of it was valid. It then keeps the bundles whose
``targets`` match the device, applies their overlays, enforces the device profile on every
resource and health check (:mod:`edge_core.policy`: roots, kinds, units, sysctl keys, modes) and
resolves every payload to the bytes to write.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_core.bundle import Bundle, DeviceIdentity, ResolvedBundle, builtin_values, parse_bundle
from edge_core.errors import BundleError
from edge_core.fleetfile import FleetDefaults, parse_fleet_file
from edge_core.policy import Refusal, check_refusal, resource_refusal
from edge_core.profiles import DeviceProfile
from edge_core.resources import CommandRes, File, HealthCheck, Resource, SecretFile, SystemdUnit
from edge_core.yamlsafe import load_yaml

__all__ = ["DesiredState", "DeviceIdentity", "bundle_files", "render_template", "select"]

FLEET_FILE = "fleet.yaml"


@dataclass(frozen=True)
class DesiredState:
    """Everything the device must apply for one release.

    ``resources`` are in bundle-name order, then declaration order; ``checks`` pairs each health
    check with its bundle (the profile's defaults come last, as ``profile:<name>``); ``payloads``
    maps a resource id to the bytes to write (sealed bytes for ``secret_file``).
    """

    bundles: tuple[str, ...]
    resources: tuple[Resource, ...]
    checks: tuple[tuple[str, HealthCheck], ...]
    payloads: Mapping[str, bytes]
    fleet: FleetDefaults = field(default_factory=FleetDefaults)
    #: ``(spec, digest)`` of each resource once computed (they depend only on the resource, its
    #: payload and the device's keys): a daemon that keeps this state between syncs computes them once.
    spec_memo: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict, compare=False, repr=False)


def bundle_files(tree: Mapping[str, bytes]) -> dict[str, str]:
    """Return ``{bundle name: path of its bundle.yaml}`` for every ``bundles/<name>/bundle.yaml``."""
    out: dict[str, str] = {}
    for path in tree:
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "bundles" and parts[2] == "bundle.yaml":
            out[parts[1]] = path
    return dict(sorted(out.items()))


def render_template(text: str, values: Mapping[str, str], where: tuple[str | int, ...] = ()) -> str:
    """Substitute ``${name}`` (and ``$name``) from ``values``; ``$$`` is a literal ``$``.

    Raises:
        BundleError: the template names a value that does not exist, or has a bad placeholder.
    """
    try:
        return string.Template(text).substitute(values)
    except KeyError as exc:
        raise BundleError(f"template refers to unknown value ${{{exc.args[0]}}}", where) from exc
    except ValueError as exc:
        raise BundleError(f"template has an invalid placeholder: {exc}", where) from exc


def _parse_all(tree: Mapping[str, bytes]) -> list[Bundle]:
    bundles: list[Bundle] = []
    for name, path in bundle_files(tree).items():
        try:
            doc = load_yaml(tree[path], name=path)
            bundles.append(parse_bundle(name, doc.value))
        except BundleError as exc:
            if exc.file:
                raise
            raise BundleError(exc.reason, exc.where, file=path) from exc
    return bundles


def _fleet(tree: Mapping[str, bytes]) -> FleetDefaults:
    data = tree.get(FLEET_FILE)
    if data is None:
        return FleetDefaults()
    try:
        return parse_fleet_file(load_yaml(data, name=FLEET_FILE).value)
    except BundleError as exc:
        if exc.file:
            raise
        raise BundleError(exc.reason, exc.where, file=FLEET_FILE) from exc


def _enforce(refusal: Refusal | None, file: str) -> None:
    if refusal is not None:
        raise refusal.error(f"{file}: {refusal.message}")


def _payload(res: Resource, rb: ResolvedBundle, tree: Mapping[str, bytes], values: Mapping[str, str],
             file: str) -> bytes | None:
    if isinstance(res, SecretFile):
        data = tree.get(res.secret)
        if data is None:
            raise BundleError(f"resource {res.id!r}: sealed secret {res.secret} is not in the release",
                              file=file)
        return data
    if not isinstance(res, File | SystemdUnit):
        return None
    if res.content is not None:
        data = res.content.encode("utf-8")
    elif res.source is not None:
        src = f"bundles/{rb.name}/{rb.sources.get(res.source, res.source)}"
        found = tree.get(src)
        if found is None:
            raise BundleError(f"resource {res.id!r}: payload {src} is not in the release", file=file)
        data = found
    else:
        return None
    if isinstance(res, File) and res.template:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleError(f"resource {res.id!r}: a template must be UTF-8 text", file=file) from exc
        try:
            data = render_template(text, values).encode("utf-8")
        except BundleError as exc:
            raise BundleError(f"resource {res.id!r}: {exc.reason}", file=file) from exc
    return data


def select(tree: Mapping[str, bytes], device: DeviceIdentity, profile: DeviceProfile) -> DesiredState:
    """Return the desired state of ``device`` for the verified release ``tree`` (path -> bytes).

    Raises:
        BundleError: any bundle or fleet.yaml is malformed, a payload or sealed secret is missing,
            a resource id is declared by two bundles the device receives, a ``watch`` names an
            unknown id, or a template refers to an unknown value.
        ConfinementError: a resource writes outside the profile's allowed roots (or inside a
            denied one), or configures a unit or sysctl file the profile does not allow.
        DriverUnavailable: a resource or health-check kind, a unit, a sysctl key or a mode the
            profile does not allow.
    """
    fleet = _fleet(tree)
    chosen = [b for b in _parse_all(tree) if b.targets_device(device)]
    resources: list[Resource] = []
    payloads: dict[str, bytes] = {}
    checks: list[tuple[str, HealthCheck]] = []
    owner: dict[str, str] = {}
    for bundle in chosen:
        file = f"bundles/{bundle.name}/bundle.yaml"
        try:
            rb = bundle.resolve(device)
        except BundleError as exc:
            raise BundleError(exc.reason, exc.where, file=file) from exc
        values = {**rb.values, **builtin_values(device)}
        for res in rb.resources:
            if res.id in owner:
                raise BundleError(f"resource id {res.id!r} is declared by bundles {owner[res.id]!r} and "
                                  f"{bundle.name!r}, which both target this device", file=file)
            owner[res.id] = bundle.name
            _enforce(resource_refusal(res, profile), file)
            data = _payload(res, rb, tree, values, file)
            if data is not None:
                payloads[res.id] = data
            resources.append(res)
        for check in bundle.health:
            _enforce(check_refusal(check, profile), file)
        checks.extend((bundle.name, c) for c in bundle.health)
    for res in resources:
        watch = res.watch if isinstance(res, SystemdUnit | CommandRes) else ()
        for w in watch:
            if w not in owner:
                raise BundleError(f"resource {res.id!r} watches {w!r}, which this device does not receive",
                                  file=f"bundles/{res.bundle}/bundle.yaml")
    checks.extend((f"profile:{profile.name}", c) for c in profile.health)
    return DesiredState(bundles=tuple(b.name for b in chosen), resources=tuple(resources),
                        checks=tuple(checks), payloads=payloads, fleet=fleet)
