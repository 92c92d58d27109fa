"""Gate evaluation for one wave: failure count, failure rate and telemetry gates. Pure.

* Failure count: the wave fails when more than ``max_failures`` of its devices failed (always judged).
* Failure rate: failures / reported devices; judged only once ``min_reported`` devices reported,
  and fails when above ``max_failure_rate``.
* Telemetry gates: judged on the latest health sample of each device of the wave that has one;
  a gate with no sampled device is not judged.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .plan import TelemetryGate, Wave

__all__ = ["GateResult", "evaluate_failures", "evaluate_telemetry", "extract_metrics", "failure_gates_pass",
           "merge_results"]

_OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt,
                                                    ">=": operator.ge}


@dataclass(frozen=True)
class GateResult:
    """The verdict of some gates: ``reasons`` say why it failed, ``tripped`` names the devices."""

    passed: bool
    reasons: tuple[str, ...] = ()
    tripped: tuple[str, ...] = ()
    detail: Mapping[str, Any] | None = None


def evaluate_failures(wave: Wave, *, reported: int, failed: Sequence[str]) -> GateResult:
    """Judge the count and rate gates of ``wave`` given how many devices reported and which failed."""
    reasons: list[str] = []
    failures = len(failed)
    rate = failures / reported if reported else 0.0
    rate_judged = wave.max_failure_rate is not None and reported >= wave.min_reported
    if wave.max_failures is not None and failures > wave.max_failures:
        reasons.append(f"{failures} devices failed, more than max_failures {wave.max_failures}")
    if rate_judged and wave.max_failure_rate is not None and rate > wave.max_failure_rate:
        reasons.append(f"failure rate {rate:.3f} ({failures}/{reported}) above max_failure_rate "
                       f"{wave.max_failure_rate:g}")
    detail = {"failures": failures, "reported": reported, "failure_rate": round(rate, 6),
              "rate_judged": rate_judged}
    return GateResult(passed=not reasons, reasons=tuple(reasons),
                      tripped=tuple(sorted(failed)) if reasons else (), detail=detail)


def failure_gates_pass(wave: Wave, *, reported: int, failures: int) -> bool:
    """Tell whether :func:`evaluate_failures` passes with ``failures`` failed devices, from the counts
    alone (the engine asks this on every step; the device list is built only when a gate trips)."""
    if wave.max_failures is not None and failures > wave.max_failures:
        return False
    rate = failures / reported if reported else 0.0
    rate_judged = wave.max_failure_rate is not None and reported >= wave.min_reported
    return not (rate_judged and wave.max_failure_rate is not None and rate > wave.max_failure_rate)


def _check_values(checks: object) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(checks, list):
        return out
    for check in checks:
        if (isinstance(check, Mapping) and isinstance(check.get("name"), str)
                and isinstance(check.get("ok"), bool)):
            key = "check:" + check["name"]
            out[key] = min(out.get(key, 1.0), 1.0 if check["ok"] else 0.0)
    return out


def _finite(values: Iterable[object]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]


def extract_metrics(health: Mapping[str, Any] | None, gates: Sequence[TelemetryGate]) -> dict[str, float]:
    """Return the values the ``gates`` look at from one health report (``metrics`` + ``checks``).

    ``disk_free_percent`` is the lowest ``percent_free`` of any mount, ``temperature_max`` the highest
    sensor, ``check:<name>`` is 1 when every check of that name passed and 0 otherwise. Metrics the
    report lacks are left out.
    """
    if not health or not gates:
        return {}
    metrics = health.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    found: dict[str, float] = {}
    for name in ("memory_percent", "cpu_percent"):
        values = _finite([metrics.get(name)])
        if values:
            found[name] = values[0]
    disks = metrics.get("disk")
    if isinstance(disks, Mapping):
        frees = _finite(d.get("percent_free") for d in disks.values() if isinstance(d, Mapping))
        if frees:
            found["disk_free_percent"] = min(frees)
    temps = metrics.get("temperatures")
    if isinstance(temps, Mapping):
        values = _finite(temps.values())
        if values:
            found["temperature_max"] = max(values)
    found.update(_check_values(health.get("checks")))
    wanted = {g.metric for g in gates}
    return {k: v for k, v in found.items() if k in wanted}


def evaluate_telemetry(gates: Sequence[TelemetryGate],
                       samples: Mapping[str, Mapping[str, float]]) -> GateResult:
    """Judge each telemetry gate on ``samples`` (device -> metric -> latest value)."""
    reasons: list[str] = []
    tripped: set[str] = set()
    judged: list[dict[str, Any]] = []
    for gate in gates:
        values = {d: s[gate.metric] for d, s in samples.items() if gate.metric in s}
        if not values:
            judged.append({"metric": gate.metric, "judged": False})
            continue
        bad = sorted(d for d, v in values.items() if not _OPS[gate.op](v, gate.value))
        good = len(values) - len(bad)
        if gate.for_devices == "all":
            ok = not bad
        elif gate.for_devices == "any":
            ok = good > 0
        else:
            ok = good * 100 >= float(gate.for_devices) * len(values)
        judged.append({"metric": gate.metric, "judged": True, "passed": ok, "sampled": len(values),
                       "meeting": good})
        if not ok:
            reasons.append(f"telemetry gate {gate.metric} {gate.op} {gate.value:g} for {gate.for_devices} "
                           f"devices not met ({good}/{len(values)} meet it)")
            tripped.update(bad)
    return GateResult(passed=not reasons, reasons=tuple(reasons), tripped=tuple(sorted(tripped)),
                      detail={"telemetry": judged})


def merge_results(*results: GateResult) -> GateResult:
    """Combine verdicts: passed when all passed; reasons, tripped devices and details joined."""
    detail: dict[str, Any] = {}
    for r in results:
        detail.update(r.detail or {})
    tripped = sorted({d for r in results for d in r.tripped})
    return GateResult(passed=all(r.passed for r in results),
                      reasons=tuple(x for r in results for x in r.reasons), tripped=tuple(tripped),
                      detail=detail)
