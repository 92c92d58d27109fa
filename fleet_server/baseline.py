"""The fleet baseline: the last-good release a device without its own assignment runs.

One retained message for the whole fleet (``<prefix>/_broadcast/baseline``), so moving it costs one
publish however many devices there are. The rule (``docs/rollouts.md``):

* a release recorded whose fleet.yaml declares no ``rollout:`` is not governed by a rollout: the
  baseline moves to it (devices follow new releases at once, as without rollouts);
* a release whose fleet.yaml declares a rollout is governed: the baseline stays where it is, so
  devices reach the release only through their wave's per-device assignment;
* a rollout that succeeds moves the baseline to its release; one that is rolled back after it had
  succeeded moves it back to the rollout's previous release. Running, paused, halted or aborted
  rollouts leave it alone.

The baseline is stored in the fleet database and published again (retained) at every start, so a
restarted server or a broker that lost its retained messages serves it again. With nothing stored
(a fleet upgraded from a version without baselines), :meth:`FleetBaseline.start` seeds it from the
newest release that either no rollout governed or a rollout took to success.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_core.errors import MessageError
from fleet_server.errors import BrokerError, StoreError
from fleet_server.rollouts.engine import RolloutState
from fleet_server.store import FleetStore

__all__ = ["FleetBaseline", "PublishBaseline", "log_phase_errors"]

log = logging.getLogger(__name__)

PublishBaseline = Callable[[str, int], None]
"""``publish_baseline(revision, release)``: publish the retained fleet baseline."""

_SEED_LOOKBACK = 1000


class FleetBaseline:
    """Keeps the fleet baseline: stores it, publishes it retained, moves it by the rule above.

    Args:
        store: the fleet database.
        publish: publishes the retained baseline message (``Ingestor.publish_baseline``).
        clock: POSIX time for audit entries.
    """

    def __init__(self, store: FleetStore, publish: PublishBaseline, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._publish = publish
        self._clock = clock
        self._lock = threading.Lock()

    def current(self) -> tuple[int, str] | None:
        """Return the baseline ``(release, commit)``, None when the fleet has none yet.

        Raises:
            StoreError: the database cannot be read.
        """
        return self._store.fleet_baseline()

    def start(self) -> tuple[int, str] | None:
        """Load the stored baseline (seeding it when none is stored) and publish it retained; return it.

        Raises:
            StoreError: the database cannot be read or written.
        """
        with self._lock:
            current = self._store.fleet_baseline()
            if current is None:
                current = self._seed()
                if current is not None:
                    self._store.set_fleet_baseline(*current)
                    log.info("fleet baseline seeded at release %s (%s)", *current)
            if current is not None:
                self._send(*current)
            return current

    def _seed(self) -> tuple[int, str] | None:
        governed = {int(r["release"]) for r in self._store.rollout_rows(limit=_SEED_LOOKBACK)}
        succeeded = {int(r["release"]): str(r["commit"])
                     for r in self._store.rollout_rows(phases=("succeeded",), limit=_SEED_LOOKBACK)}
        candidates = dict(succeeded)
        for row in self._store.releases(limit=_SEED_LOOKBACK):
            if int(row["version"]) not in governed:
                candidates[int(row["version"])] = str(row["commit"])
        if not candidates:
            return None
        newest = max(candidates)
        return newest, candidates[newest]

    def move(self, release: int, commit: str, *, reason: str) -> bool:
        """Make ``release`` at ``commit`` the baseline (stored, audited, published); False when it
        already is.

        Raises:
            StoreError: the database cannot be written (nothing is published then).
        """
        with self._lock:
            if self._store.fleet_baseline() == (release, commit):
                return False
            self._store.set_fleet_baseline(release, commit)
            self._store.add_audit("fleet-server", "baseline.move", "baseline", reason,
                                  {"release": release, "commit": commit}, now=self._clock())
            log.info("fleet baseline moved to release %s (%s): %s", release, commit, reason)
            self._send(release, commit)
            return True

    def on_governed_release(self, release: int) -> None:
        """A release a rollout governs was recorded: keep the baseline; with none yet, pin it to the
        newest recorded release below ``release`` (what devices following the head ran until now).

        Raises:
            StoreError: the database cannot be read or written.
        """
        if self._store.fleet_baseline() is not None:
            return
        older = [r for r in self._store.releases(limit=_SEED_LOOKBACK) if int(r["version"]) < release]
        if older:
            newest = max(older, key=lambda r: int(r["version"]))
            self.move(int(newest["version"]), str(newest["commit"]),
                      reason=f"release {release} is governed by a rollout; devices stay on the last release")

    def on_phase(self, state: RolloutState, old_phase: str) -> None:
        """Follow a rollout's phase change: success moves the baseline to its release; a rollback of a
        release the baseline names moves it back to the rollout's previous release.

        Raises:
            StoreError: the database cannot be read or written.
        """
        release = state.release
        if state.phase == "succeeded":
            self.move(release.version, release.commit,
                      reason=f"rollout {state.rollout_id} of release {release.version} succeeded")
        elif state.phase in ("rolling_back", "rolled_back") and state.previous is not None \
                and self._store.fleet_baseline() == (release.version, release.commit):
            self.move(state.previous.version, state.previous.commit,
                      reason=f"rollout {state.rollout_id} of release {release.version} is rolled back")

    def _send(self, release: int, commit: str) -> None:
        try:
            self._publish(commit, release)
        except (BrokerError, MessageError) as exc:
            log.error("cannot publish the fleet baseline (published again at the next start or move): %s",
                      exc)


def log_phase_errors(baseline: FleetBaseline) -> Callable[[RolloutState, str], None]:
    """Return a phase listener for the rollout runner that moves ``baseline`` and logs store errors
    instead of raising them into the runner's tick."""

    def listener(state: RolloutState, old_phase: str) -> None:
        try:
            baseline.on_phase(state, old_phase)
        except StoreError as exc:
            log.error("fleet baseline not moved for rollout %s (%s -> %s): %s", state.rollout_id, old_phase,
                      state.phase, exc)

    return listener
