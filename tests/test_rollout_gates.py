"""Gate evaluation and maintenance windows: tables of inputs and verdicts, frozen times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fleet_server.rollouts.gates import evaluate_failures, evaluate_telemetry, extract_metrics
from fleet_server.rollouts.plan import TelemetryGate, Wave
from fleet_server.rollouts.windows import MaintenanceWindow, in_any_window, parse_cron, window_is_open


@pytest.mark.parametrize(("wave", "reported", "failed", "passed"), [
    (Wave("w"), 10, [], True),
    (Wave("w"), 10, ["a"], False),                                        # default: zero tolerance
    (Wave("w", max_failure_rate=0.2), 10, ["a", "b"], True),              # 0.2 is not above 0.2
    (Wave("w", max_failure_rate=0.2), 10, ["a", "b", "c"], False),
    (Wave("w", max_failure_rate=0.1, min_reported=5), 4, ["a", "b"], True),  # rate not judged yet
    (Wave("w", max_failure_rate=0.1, min_reported=5), 5, ["a", "b"], False),
    (Wave("w", max_failure_rate=None, max_failures=1), 3, ["a"], True),
    (Wave("w", max_failure_rate=None, max_failures=1), 3, ["a", "b"], False),
    (Wave("w", max_failure_rate=1.0, max_failures=0, min_reported=50), 2, ["a"], False),  # count always
    (Wave("w"), 0, [], True),
])
def test_failure_gates(wave: Wave, reported: int, failed: list[str], passed: bool) -> None:
    result = evaluate_failures(wave, reported=reported, failed=failed)
    assert result.passed is passed
    assert (result.tripped == tuple(sorted(failed))) is (not passed or not failed)
    assert bool(result.reasons) is (not passed)


HEALTH: dict[str, Any] = {
    "metrics": {"memory_percent": 71.5, "cpu_percent": 12.0,
                "disk": {"/": {"percent_free": 40.0}, "/data": {"percent_free": 8.5}},
                "temperatures": {"cpu/0": 55.0, "gpu/0": 61.0}},
    "checks": [{"name": "nginx", "ok": True}, {"name": "db", "ok": False}, {"name": "db", "ok": True}],
}


def test_extract_metrics_takes_only_what_gates_need() -> None:
    gates = [TelemetryGate(m, "<", 1) for m in
             ("memory_percent", "cpu_percent", "disk_free_percent", "temperature_max", "check:nginx",
              "check:db", "check:absent")]
    assert extract_metrics(HEALTH, gates) == {"memory_percent": 71.5, "cpu_percent": 12.0,
                                              "disk_free_percent": 8.5, "temperature_max": 61.0,
                                              "check:nginx": 1.0, "check:db": 0.0}
    assert extract_metrics(HEALTH, gates[:1]) == {"memory_percent": 71.5}
    assert extract_metrics(None, gates) == {}
    assert extract_metrics({"metrics": {"memory_percent": float("nan")}}, gates) == {}


@pytest.mark.parametrize(("gate", "passed", "tripped"), [
    (TelemetryGate("memory_percent", "<", 80), False, ("c",)),
    (TelemetryGate("memory_percent", "<", 80, "any"), True, ()),
    (TelemetryGate("memory_percent", "<", 80, 60.0), True, ()),
    (TelemetryGate("memory_percent", "<", 80, 70.0), False, ("c",)),
    (TelemetryGate("memory_percent", "<=", 90), True, ()),
    (TelemetryGate("memory_percent", ">", 100, "any"), False, ("a", "b", "c")),
    (TelemetryGate("check:app", ">=", 1), False, ("b",)),
    (TelemetryGate("temperature_max", "<", 10), True, ()),  # nobody sampled it: not judged
])
def test_telemetry_gates(gate: TelemetryGate, passed: bool, tripped: tuple[str, ...]) -> None:
    samples = {"a": {"memory_percent": 50.0, "check:app": 1.0},
               "b": {"memory_percent": 70.0, "check:app": 0.0},
               "c": {"memory_percent": 90.0}}
    result = evaluate_telemetry([gate], samples)
    assert result.passed is passed
    assert result.tripped == tripped


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("cron", "duration", "moment", "open_"), [
    ("0 2 * * *", 3600, "2024-05-06 02:00:00", True),
    ("0 2 * * *", 3600, "2024-05-06 02:59:59", True),
    ("0 2 * * *", 3600, "2024-05-06 03:00:00", False),
    ("0 2 * * *", 3600, "2024-05-06 01:59:59", False),
    ("0 22 * * *", 4 * 3600, "2024-05-07 01:30:00", True),      # across midnight
    ("0 2 * * 1-5", 3600, "2024-05-05 02:30:00", False),          # a Sunday
    ("0 2 * * 1-5", 3600, "2024-05-06 02:30:00", True),           # a Monday
    ("0 2 * * 7", 3600, "2024-05-05 02:30:00", True),             # 7 is Sunday too
    ("*/15 * * * *", 300, "2024-05-06 10:31:00", True),
    ("*/15 * * * *", 300, "2024-05-06 10:36:00", False),
    ("0 0 1 * 1", 3600, "2024-05-06 00:10:00", True),             # day-of-month OR day-of-week
    ("0 0 1 * 1", 3600, "2024-05-01 00:10:00", True),
    ("0 0 1 * 1", 3600, "2024-05-02 00:10:00", False),
    ("30 1 * 12 *", 3600, "2024-05-06 01:45:00", False),
])
def test_windows(cron: str, duration: int, moment: str, open_: bool) -> None:
    window = MaintenanceWindow(parse_cron(cron), duration)
    assert window_is_open(window, _at(moment)) is open_
    assert in_any_window([window], _at(moment)) is open_


def test_no_window_means_always_open() -> None:
    assert in_any_window([], 0.0)


def test_cron_fields() -> None:
    spec = parse_cron("5,10-12 */6 1 1-3 0")
    assert spec.minutes == frozenset({5, 10, 11, 12})
    assert spec.hours == frozenset({0, 6, 12, 18})
    assert spec.days == frozenset({1})
    assert spec.months == frozenset({1, 2, 3})
    assert spec.weekdays == frozenset({0})
