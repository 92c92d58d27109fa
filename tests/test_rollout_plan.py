"""Rollout plan parsing: defaults, every field, and errors that name where the problem is."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from edge_core.errors import BundleError
from fleet_server.rollouts.plan import PlanRef, RolloutPlan, parse_fleet_rollout, parse_plan

EXAMPLE = """
description: Canary devices first, then a quarter of the fleet, then everyone.
waves:
  - name: canary
    selector:
      labels: {canary: "true"}
    soak: 30m
    max_failures: 0
    timeout: 15m
    promotion: auto
  - name: quarter
    percent: 25
    soak: 1h
    max_failure_rate: 0.05
    timeout: 30m
    promotion: auto
  - name: everyone
    percent: 100
    soak: 0s
    max_failure_rate: 0.02
    timeout: 1h
    promotion: manual
rollback_on_failure: true
"""


def test_example_plan_parses_with_its_values() -> None:
    plan = parse_plan(yaml.safe_load(EXAMPLE), source="rollouts/default.yaml")
    assert plan.name == "default"
    assert [w.name for w in plan.waves] == ["canary", "quarter", "everyone"]
    canary, quarter, everyone = plan.waves
    assert canary.selector is not None
    assert canary.selector.labels == {"canary": ("true",)}
    assert (canary.soak, canary.timeout, canary.max_failures) == (1800, 900, 0)
    assert quarter.percent == 25.0
    assert quarter.soak == 3600
    assert quarter.max_failure_rate == 0.05
    assert everyone.soak == 0
    assert everyone.promotion == "manual"
    assert all(w.on_failure == "rollback" for w in plan.waves)


def test_defaults() -> None:
    plan = parse_plan({"waves": [{"percent": 10}, {"percent": 100}]}, source="rollouts/fast.yaml")
    assert plan.name == "fast"
    assert plan.canary_first
    assert plan.canary_label == "canary"
    assert plan.rate_limit_per_minute is None
    assert plan.maintenance_windows == ()
    assert plan.target is None
    wave = plan.waves[0]
    assert wave.name == "wave-1"
    assert (wave.soak, wave.timeout, wave.max_failure_rate, wave.max_failures, wave.min_reported) == \
        (600, 1800, 0.0, None, 1)
    assert (wave.offline, wave.promotion, wave.on_failure, wave.gates) == ("pending", "auto", "halt", ())


def test_every_field() -> None:
    raw: dict[str, Any] = {
        "name": "full", "canary_first": False, "canary_label": "pilot", "rate_limit_per_minute": 30,
        "target": {"labels": {"site": ["a", "b"]}},
        "maintenance_windows": [{"cron": "0 2 * * 1-5", "duration": "2h"}],
        "waves": [
            {"name": "one", "count": 5, "soak": 90, "max_failures": 1, "max_failure_rate": None,
             "min_reported": 3, "timeout": "10m", "offline": "failed", "promotion": "manual",
             "on_failure": "rollback",
             "gates": [{"metric": "memory_percent", "op": "<", "value": 90, "for_devices": "all"},
                       {"metric": "check:nginx"},
                       {"metric": "temperature_max", "op": "<=", "value": 80, "for_devices": "75%"}]},
            {"name": "two", "selector": {"profiles": ["gateway"]}, "offline": "skipped"},
        ],
    }
    plan = parse_plan(raw, source="rollouts/full.yaml")
    assert plan.name == "full"
    assert not plan.canary_first
    assert plan.canary_label == "pilot"
    assert plan.rate_limit_per_minute == 30
    assert plan.target is not None
    assert plan.target.labels == {"site": ("a", "b")}
    assert plan.maintenance_windows[0].duration == 7200
    assert plan.maintenance_windows[0].cron.weekdays == frozenset({1, 2, 3, 4, 5})
    one = plan.waves[0]
    assert one.count == 5
    assert one.max_failure_rate is None
    assert one.min_reported == 3
    assert one.timeout == 600
    assert [(g.metric, g.op, g.value, g.for_devices) for g in one.gates] == [
        ("memory_percent", "<", 90.0, "all"), ("check:nginx", ">=", 1.0, "all"),
        ("temperature_max", "<=", 80.0, 75.0)]
    assert plan.waves[1].offline == "skipped"


@pytest.mark.parametrize(("raw", "where", "words"), [
    ([], (), "mapping"),
    ({"waves": []}, ("waves",), "non-empty"),
    ({"waves": [{"percent": 10}], "surprise": 1}, ("surprise",), "unknown key"),
    ({"waves": [{"percent": 10, "count": 3}]}, ("waves", 0), "not percent and count"),
    ({"waves": [{"percent": 10}, {"soak": 5}]}, ("waves", 1), "needs one of"),
    ({"canary_first": False, "waves": [{"soak": 5}]}, ("waves", 0), "needs one of"),
    ({"waves": [{"percent": 0}]}, ("waves", 0, "percent"), "more than 0"),
    ({"waves": [{"percent": 101}]}, ("waves", 0, "percent"), "from 0 to 100"),
    ({"waves": [{"percent": 50}, {"percent": 20}]}, ("waves", 1, "percent"), "cumulative"),
    ({"waves": [{"count": 0}]}, ("waves", 0, "count"), "at least 1"),
    ({"waves": [{"count": 2, "soak": "soon"}]}, ("waves", 0, "soak"), "duration"),
    ({"waves": [{"count": 2, "timeout": 0}]}, ("waves", 0, "timeout"), "duration"),
    ({"waves": [{"count": 2, "max_failure_rate": 1.5}]}, ("waves", 0, "max_failure_rate"), "from 0 to 1"),
    ({"waves": [{"count": 2, "offline": "ignore"}]}, ("waves", 0, "offline"), "pending, failed, skipped"),
    ({"waves": [{"count": 2, "promotion": "yes"}]}, ("waves", 0, "promotion"), "auto, manual"),
    ({"waves": [{"count": 2, "on_failure": "panic"}]}, ("waves", 0, "on_failure"), "halt, rollback"),
    ({"waves": [{"name": "a", "count": 2}, {"name": "a", "count": 2}]}, ("waves", 1, "name"), "duplicate"),
    ({"waves": [{"count": 2, "gates": [{"metric": "load", "op": "<", "value": 1}]}]},
     ("waves", 0, "gates", 0, "metric"), "metric must be"),
    ({"waves": [{"count": 2, "gates": [{"metric": "cpu_percent", "op": "==", "value": 1}]}]},
     ("waves", 0, "gates", 0, "op"), "one of"),
    ({"waves": [{"count": 2, "gates": [{"metric": "cpu_percent", "op": "<"}]}]},
     ("waves", 0, "gates", 0, "value"), "required"),
    ({"waves": [{"count": 2, "gates": [{"metric": "cpu_percent", "op": "<", "value": 5,
                                        "for_devices": "most"}]}]},
     ("waves", 0, "gates", 0, "for_devices"), "percentage"),
    ({"waves": [{"count": 2, "selector": {"labels": {"a": "b"}}}]}, ("waves", 0), "not count and selector"),
    ({"waves": [{"selector": {"colour": "red"}}]}, ("waves", 0, "selector", "colour"),
     "unknown selector key"),
    ({"rate_limit_per_minute": 0, "waves": [{"count": 2}]}, ("rate_limit_per_minute",), "at least 1"),
    ({"maintenance_windows": [{"cron": "0 25 * * *", "duration": "1h"}], "waves": [{"count": 2}]},
     ("maintenance_windows", 0, "cron"), "out of range"),
    ({"maintenance_windows": [{"cron": "0 2 * *", "duration": "1h"}], "waves": [{"count": 2}]},
     ("maintenance_windows", 0, "cron"), "five fields"),
    ({"maintenance_windows": [{"cron": "0 2 * * *"}], "waves": [{"count": 2}]},
     ("maintenance_windows", 0), "needs 'cron' and 'duration'"),
    ({"name": "../etc", "waves": [{"count": 2}]}, ("name",), "name must be"),
])
def test_errors_name_their_location(raw: object, where: tuple[str | int, ...], words: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_plan(raw, source="rollouts/bad.yaml")
    assert info.value.where == where
    assert info.value.file == "rollouts/bad.yaml"
    assert words in info.value.reason


def test_fleet_rollout_reference_inline_and_absent() -> None:
    assert parse_fleet_rollout({"plan": "default"}) == PlanRef("default")
    assert parse_fleet_rollout(None) is None
    assert parse_fleet_rollout({}) is None
    inline = parse_fleet_rollout({"waves": [{"percent": 100}]})
    assert isinstance(inline, RolloutPlan)
    assert inline.name == "default"
    with pytest.raises(BundleError) as info:
        parse_fleet_rollout({"waves": [{"percent": "lots"}]})
    assert info.value.where == ("rollout", "waves", 0, "percent")
    assert info.value.file == "fleet.yaml"
    with pytest.raises(BundleError) as info:
        parse_fleet_rollout({"plan": "default", "waves": []})
    assert info.value.where == ("rollout",)


def test_parsing_the_raw_document_again_gives_an_equal_plan() -> None:
    plan = parse_plan(yaml.safe_load(EXAMPLE), source="rollouts/default.yaml")
    assert parse_plan(plan.raw, source=plan.source) == plan
