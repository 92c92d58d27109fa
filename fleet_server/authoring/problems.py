"""Every problem of a config repo's documents, for ``fleetctl lint``: not just the first one.

A device parses a bundle or ``fleet.yaml`` and stops at the first problem; the operator wants them
all at once, and every profile of the search path loaded to check bundles against. The parsers
themselves are the shared ones of :mod:`edge_core` (one definition of each format).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from edge_core.bundle import Bundle, collect_bundle
from edge_core.errors import BundleError
from edge_core.fleetfile import collect_fleet_file
from edge_core.profiles import DeviceProfile, load_profile_file

__all__ = ["fleet_problems", "load_all_profiles", "parse_bundle_partial"]

log = logging.getLogger(__name__)


def parse_bundle_partial(name: str, value: object) -> tuple[Bundle | None, list[BundleError]]:
    """Return the bundle built from the parts of ``value`` that are valid, and every problem.

    ``fleetctl lint`` checks policy (profiles, payloads) on whatever parsed even when other parts
    are broken. The bundle is None only when ``value`` is not a mapping.
    """
    return collect_bundle(name, value)


def fleet_problems(value: object) -> list[BundleError]:
    """Return every format problem of a loaded ``fleet.yaml`` (empty when it is valid)."""
    return collect_fleet_file(value)[1]


def load_all_profiles(search_dirs: Sequence[Path]) -> dict[str, DeviceProfile]:
    """Load every ``*.yaml`` profile of ``search_dirs``; an earlier directory wins on a name clash.

    Missing directories are skipped.

    Raises:
        ConfigError: a profile file is invalid.
    """
    found: dict[str, DeviceProfile] = {}
    for d in search_dirs:
        directory = Path(d)
        if not directory.is_dir():
            log.debug("profile directory %s does not exist", directory)
            continue
        for path in sorted(directory.glob("*.yaml")):
            if path.stem in found:
                continue
            found[path.stem] = load_profile_file(path)
    return found
