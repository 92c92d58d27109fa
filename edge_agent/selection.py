"""What a sync aims at, and whether the release it found may replace the installed one.

A device follows, first match wins (``docs/agent-config.md``):

1. ``local``: a commit named for this one sync by the device's own operator (``edge-agent sync
   --want``);
2. ``assigned``: the revision the fleet server assigned to this device (its retained ``desired``
   message, persisted in the state database);
3. ``baseline``: the fleet baseline, the retained ``<prefix>/_broadcast/baseline`` naming the fleet's
   last-good release (persisted too). A baseline older than the installed release keeps the device
   on what it runs: the baseline never moves a device backwards;
4. ``head``: the branch head, only while no fleet server has ever spoken to the device.

Monotonic rule (``docs/trust.md``): a release older than the installed one is installed only from an
explicit instruction (``local`` or ``assigned``); from the baseline or the branch head it is refused
with :class:`RollbackError`, and the device stays as it is. The signed rollback floor applies to
every source, instructions included (the verifier checks it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edge_agent.config import AgentConfig
from edge_agent.state import Installed, StateDB
from edge_core.errors import RollbackError

__all__ = [
    "INSTRUCTED",
    "Baseline",
    "Target",
    "check_monotonic",
    "choose",
    "fleet_baseline",
    "load_baseline",
    "set_fleet_baseline",
    "store_baseline",
    "target_for",
    "target_in",
]

STATE_DB = "state.db"
_META_BASELINE = "fleet_baseline"
META_ASSIGNED = "assigned_revision"
"""The state-database key of the revision the fleet server assigned (absent: none)."""

INSTRUCTED = frozenset({"local", "assigned"})
"""The sources that may install a release older than the installed one."""


@dataclass(frozen=True)
class Baseline:
    """The fleet's last-good release, as the fleet server last published it."""

    revision: str
    release: int


@dataclass(frozen=True)
class Target:
    """What one sync fetches (``revision`` None: the branch head) and why (``source``)."""

    revision: str | None
    source: str


def choose(*, want: str | None, assigned: str | None, baseline: Baseline | None,
           installed: Installed | None) -> Target:
    """Return what a sync aims at, in the order of the module docstring."""
    if want:
        return Target(want, "local")
    if assigned:
        return Target(assigned, "assigned")
    if baseline is not None:
        if installed is not None and baseline.release < installed.version:
            return Target(installed.commit, "baseline")
        return Target(baseline.revision, "baseline")
    return Target(None, "head")


def target_in(state: StateDB, *, want: str | None = None, assigned: str | None = None) -> Target:
    """Return what a sync aims at on the device whose state database is ``state``.

    ``assigned`` None means the persisted assignment; the baseline and the installed release are
    read from ``state`` too.

    Raises:
        StateError: the state database cannot be read.
    """
    assigned = assigned or state.get_meta(META_ASSIGNED) or None
    return choose(want=want, assigned=assigned, baseline=load_baseline(state), installed=state.installed())


def target_for(config: AgentConfig, *, assigned: str | None = None) -> Target:
    """Return what the next sync of the device of ``config`` aims at (:func:`target_in`), so that the
    daemon can fetch it before taking the apply lock.

    Raises:
        StateError: the state database cannot be read.
    """
    if not (config.state_dir / STATE_DB).exists():
        return choose(want=None, assigned=assigned, baseline=None, installed=None)
    state = StateDB(config.state_dir / STATE_DB)
    try:
        return target_in(state, assigned=assigned)
    finally:
        state.close()


def check_monotonic(target: Target, version: int, installed: Installed | None) -> None:
    """Refuse a release older than the installed one unless ``target`` is an explicit instruction.

    Raises:
        RollbackError: ``version`` is below the installed release and the source is the fleet
            baseline or the branch head.
    """
    if installed is None or version >= installed.version or target.source in INSTRUCTED:
        return
    raise RollbackError(f"release {version} is older than the installed release {installed.version} "
                        f"and was not assigned by the fleet server")


def load_baseline(state: StateDB) -> Baseline | None:
    """Return the persisted fleet baseline, or None when none was received (or it is unreadable).

    Raises:
        StateError: the state database cannot be read.
    """
    text = state.get_meta(_META_BASELINE)
    if not text:
        return None
    try:
        doc = json.loads(text)
        return Baseline(revision=str(doc["revision"]), release=int(doc["release"]))
    except (ValueError, KeyError, TypeError):
        return None


def store_baseline(state: StateDB, baseline: Baseline | None) -> None:
    """Persist the fleet baseline (None forgets it).

    Raises:
        StateError: the state database cannot be written.
    """
    value = None if baseline is None else json.dumps({"revision": baseline.revision,
                                                      "release": baseline.release})
    state.set_meta(_META_BASELINE, value)


def fleet_baseline(config: AgentConfig) -> Baseline | None:
    """Return the fleet baseline persisted in the device's state database (None: none yet).

    Raises:
        StateError: the state database cannot be read.
    """
    if not (config.state_dir / STATE_DB).exists():
        return None
    state = StateDB(config.state_dir / STATE_DB)
    try:
        return load_baseline(state)
    finally:
        state.close()


def set_fleet_baseline(config: AgentConfig, baseline: Baseline | None) -> None:
    """Persist the fleet baseline the fleet server published in the device's state database.

    Raises:
        StateError: the state database cannot be written.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = StateDB(config.state_dir / STATE_DB)
    try:
        store_baseline(state, baseline)
    finally:
        state.close()
