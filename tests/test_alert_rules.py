"""The shipped Prometheus alert rules: valid for ``promtool check rules``, their unit tests pass under
``promtool test rules``, and every metric they name is one the fleet server really exports.

promtool comes from Debian's ``prometheus`` package, which the test command installs
(``tools/ensure-system-packages.sh``); without it the test is skipped, except under ``CI=true``,
where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from edge_core import messages as m
from fleet_server.config import StoreConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.metrics_notify import NotificationMetrics
from fleet_server.store import IngestBatch, open_store

RULES_DIR = Path(__file__).resolve().parent.parent / "packaging" / "prometheus"
RULES = RULES_DIR / "edge-fleet-rules.yml"
RULE_TESTS = RULES_DIR / "edge-fleet-rules.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (make sysdeps installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (make sysdeps installs it)")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=RULES_DIR, check=False)


def test_promtool_accepts_the_rules():
    done = run(promtool(), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rules_fire_as_their_unit_tests_expect():
    done = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


class _Ingest:
    def backlog_age(self) -> float:
        return 0.0

    def connected(self) -> bool:
        return True


class _Rollouts:
    def metrics_snapshot(self) -> list[dict[str, object]]:
        return []


def exported_families(config: StoreConfig) -> set[str]:
    """The metric families of a server's /metrics, with a sync in its store so the ratios exist."""
    store = open_store(config)
    try:
        now = time.time()
        batch = IngestBatch()
        applied = m.event_message("dev-1", type="sync_succeeded", commit="a" * 40, release=3, ts=now)
        batch.add("events", applied, now)
        store.apply_batch(batch)
        metrics = ServerMetrics()
        NotificationMetrics(metrics.registry)
        metrics.attach_fleet(store)
        metrics.attach_rollouts(_Rollouts())
        metrics.ingest.bind(_Ingest())
        text = metrics.exposition().decode()
    finally:
        store.close()
    return set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))


def test_every_metric_the_rules_name_is_exported(store_config: StoreConfig) -> None:
    exported = exported_families(store_config)
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert rules
    named = set()
    for rule in rules:
        for name in re.findall(r"\bfleet_[a-z_]+", rule["expr"]):
            named.add(re.sub(r"_bucket$", "", name))
    assert named
    assert sorted(named - exported) == []
    assert {"FleetBrokerDisconnected", "FleetIngestLagging", "FleetRolloutHalted", "FleetReleaseRefused",
            "FleetDevicesRefusingReleases", "FleetDevicesOffline", "FleetNotificationsFailing"} \
        <= {rule["alert"] for rule in rules}
