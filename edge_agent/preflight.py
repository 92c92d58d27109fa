"""A rollout's preflight on the device: plan the release the fleet server asks about against the
live state, apply nothing, and report what the plan found (docs/rollouts.md).

:func:`run_preflight` fetches and verifies ``revision`` exactly as a sync would (trust root,
signatures, floor, expiry, ``trust.allowed_signers``), selects this device's bundles with its
profile, probes the drivers once and plans against the managed resources. The ``plan`` report
counts the changes per kind, the resources it would prune and the drift of the last check; a
release the device would refuse (verification, selection, profile, a driver unavailable) is
``refused`` with the reason. A mirror that cannot be reached is no verdict: nothing is reported
(the preflight does not wait for this device past its timeout). Each request (rollout id and the
time the server stamped on it) is answered once; a repeat (the retained request after a reconnect)
is not.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime

from edge_agent.config import AgentConfig
from edge_agent.planning import desired_for, prepare
from edge_agent.report import build, record
from edge_agent.runtime import apply_lock, open_runtime
from edge_agent.verification import fetch_and_verify
from edge_core.errors import EdgeFleetError, FetchError
from edge_core.logs import log_context
from edge_core.preflight_messages import plan_message

__all__ = ["META_PREFLIGHT", "run_preflight"]

log = logging.getLogger(__name__)

META_PREFLIGHT = "preflight.answered"
"""The last preflight request answered: ``<rollout id> <request time>``."""


def run_preflight(config: AgentConfig, *, revision: str, rollout_id: str, requested: str,
                  now: datetime) -> str | None:
    """Answer one preflight request (``requested``: the request's own time, with the rollout id its
    identity): queue the ``plan`` report and return its outcome, or None when nothing was reported
    (already answered, or the mirror could not be reached).

    Raises:
        LockedError: another apply is running (the daemon tries again at its next safe point).
        StateError: the state database cannot be used.
    """
    key = f"{rollout_id} {requested}"
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config)
        try:
            if rt.state.get_meta(META_PREFLIGHT) == key:
                return None
            commit, version = revision, None
            changes: Counter[str] = Counter()
            prune = 0
            reason: str | None = None
            try:
                verified = fetch_and_verify(rt, revision, now)
                commit, version = verified.commit, verified.release.version
                plan = prepare(rt, desired_for(rt, verified.tree), version, commit).plan
                changes.update(c.kind for c in plan.changes)
                prune = len(plan.prune)
                outcome = "change" if changes or prune else "nochange"
            except FetchError as exc:
                log.warning("preflight of %s for rollout %s: no verdict, %s", revision, rollout_id, exc)
                return None
            except EdgeFleetError as exc:  # verification, selection, profile, drivers: a refusal
                outcome, reason = "refused", str(exc)
            drift = int(record.drift_state(rt.state).get("count") or 0)
            msg = plan_message(config.device_id, commit=commit, release=version, rollout_id=rollout_id,
                               outcome=outcome, changes=dict(changes), prune=prune, drift=drift,
                               reason=None if reason is None else reason[:2000], ts=now)
            build.queue_report(rt.state, config.mqtt_prefix, "plan", msg)
            rt.state.set_meta(META_PREFLIGHT, key)
            log.info("preflight of release %s for rollout %s: %s%s", version, rollout_id, outcome,
                     f" ({reason})" if reason else "")
            return outcome
        finally:
            rt.close()
