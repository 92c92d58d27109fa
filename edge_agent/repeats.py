"""The device's memory of its last failed sync: report it once, count repeats, hold a failed release.

One record in the state database (``sync.failure``) keeps the last failure: outcome, commit,
release, reason, step, how many syncs in a row ended with it, when it was first and last seen,
and, for an apply that failed, when it may be retried. The rule (``docs/agent-config.md``):

* the same failure (outcome and reason) for the same commit is reported once; later ones only
  raise ``repeat_count`` and ``last_seen`` in the status;
* a release that failed its health check (``rolled_back`` by a check) is held: not applied again to this
  device until the target moves to another commit, the fleet server assigns that commit anew, or
  the operator asks for it (``edge-agent sync --want COMMIT``);
* a release whose apply failed (``failed``) is retried after a capped exponential delay
  (``backoff.base`` doubling per attempt, at most ``backoff.cap``), held until then;
* a successful sync forgets the record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime

from edge_agent.backoff import ceiling
from edge_agent.results import FAILURES, SyncResult
from edge_agent.state import StateDB

__all__ = ["META_FAILURE", "Failure", "forget", "held", "load", "note", "release_hold"]

log = logging.getLogger(__name__)

META_FAILURE = "sync.failure"
_HELD = ("rolled_back", "failed")


@dataclass(frozen=True)
class Failure:
    """The last failed sync and how often it repeated (times are POSIX seconds)."""

    outcome: str
    commit: str | None
    release: int | None
    reason: str | None
    step: str | None
    count: int
    first_seen: float
    last_seen: float
    retry_at: float | None = None
    health_failed: bool = False

    def same(self, result: SyncResult) -> bool:
        """True when ``result`` is this failure again: same outcome, commit and reason."""
        return (result.outcome, result.commit, result.reason) == (self.outcome, self.commit, self.reason)


def load(state: StateDB) -> Failure | None:
    """Return the recorded failure, or None (also for a record this version cannot read)."""
    text = state.get_meta(META_FAILURE)
    if not text:
        return None
    try:
        return Failure(**json.loads(text))
    except (TypeError, ValueError):
        log.warning("ignoring an unreadable failure record")
        return None


def forget(state: StateDB) -> None:
    """Drop the failure record (after a success, or when an operator releases the hold)."""
    state.set_meta(META_FAILURE, None)


def note(state: StateDB, result: SyncResult, now: datetime, *, base: float, cap: float) -> Failure | None:
    """Record the outcome of one sync; return the failure record it belongs to (None: no failure).

    A failure equal to the recorded one raises its count; another failure starts a new record; a
    success or noop forgets it; ``paused`` leaves it as it is. ``base``/``cap`` bound the retry
    delay of a failed apply.
    """
    if result.outcome in ("applied", "noop"):
        forget(state)
        return None
    if result.outcome not in FAILURES:
        return None
    at = now.timestamp()
    last = load(state)
    if last is not None and last.same(result):
        record = replace(last, count=last.count + 1, last_seen=at)
        if result.outcome == "failed" and not result.held:
            record = replace(record, retry_at=at + ceiling(base, cap, record.count - 1))
    else:
        retry = at + ceiling(base, cap, 0) if result.outcome == "failed" else None
        record = Failure(outcome=result.outcome, commit=result.commit, release=result.version,
                         reason=result.reason, step=result.step, count=1, first_seen=at, last_seen=at,
                         retry_at=retry, health_failed=result.health_failed)
    state.set_meta(META_FAILURE, json.dumps(asdict(record), sort_keys=True))
    return record


def held(state: StateDB, commit: str, source: str, now: datetime) -> Failure | None:
    """Return the failure that keeps ``commit`` from being applied again now, or None.

    ``source`` is where the target came from (:class:`edge_agent.selection.Target`): an operator's
    ``--want`` (``local``) is never held.
    """
    if source == "local":
        return None
    last = load(state)
    if last is None or last.commit != commit or last.outcome not in _HELD:
        return None
    if last.outcome == "rolled_back" and not last.health_failed:
        return None  # a change that failed (a full disk, say) is tried again at the next sync
    if last.outcome == "failed" and (last.retry_at is None or now.timestamp() >= last.retry_at):
        return None
    return last


def release_hold(state: StateDB, revision: str | None) -> None:
    """Forget a held failure of ``revision`` (a new assignment of it by the fleet server)."""
    last = load(state)
    if revision and last is not None and last.commit is not None and last.outcome in _HELD \
            and last.commit.startswith(revision):
        log.info("the fleet server assigned %s again; it will be applied again", revision)
        forget(state)
