"""Rollout plans: ``rollouts/<name>.yaml`` and the ``rollout:`` key of ``fleet.yaml``.

Pure: takes the already-loaded YAML value and returns frozen dataclasses, or raises
:class:`~fleet_server.errors.PlanError` whose ``where`` locates the problem inside the document
(``fleetctl lint`` maps it to a line). The format and every default are documented in ``docs/rollouts.md``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from edge_core.bundle import Selector, parse_selector
from edge_core.errors import BundleError
from edge_core.fleetfile import parse_duration
from fleet_server.errors import PlanError

from .windows import MaintenanceWindow, parse_cron

__all__ = [
    "GATE_METRICS",
    "GATE_OPS",
    "OFFLINE_RULES",
    "PLAN_NAME",
    "PlanRef",
    "Preflight",
    "RolloutPlan",
    "TelemetryGate",
    "Wave",
    "parse_fleet_rollout",
    "parse_plan",
    "with_preflight",
]

Where = tuple[str | int, ...]

PLAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
GATE_METRICS = ("memory_percent", "cpu_percent", "disk_free_percent", "temperature_max")
"""Telemetry gate metrics besides ``check:<name>``."""
GATE_OPS = ("<", "<=", ">", ">=")
OFFLINE_RULES = ("pending", "failed", "skipped")
_MAX_DURATION = 7 * 86400
_PLAN_KEYS = frozenset({"name", "description", "waves", "target", "canary_first", "canary_label",
                        "rate_limit_per_minute", "maintenance_windows", "rollback_on_failure", "preflight"})
_PREFLIGHT_KEYS = frozenset({"max_refused", "timeout", "approve_after"})
_WAVE_KEYS = frozenset({"name", "percent", "count", "selector", "soak", "max_failure_rate", "max_failures",
                        "min_reported", "timeout", "offline", "promotion", "pause_before", "on_failure",
                        "gates"})
_GATE_KEYS = frozenset({"metric", "op", "value", "for_devices"})
_WINDOW_KEYS = frozenset({"cron", "duration"})
_ZERO = re.compile(r"^0+[smhd]?$")


@dataclass(frozen=True)
class TelemetryGate:
    """A condition the latest health samples of a wave's devices must meet at the end of the soak.

    ``for_devices`` is ``"any"``, ``"all"`` or a percentage (0-100) of the sampled devices.
    For ``check:<name>`` the value of a sample is 1 when the named check passed, else 0.
    """

    metric: str
    op: str
    value: float
    for_devices: str | float = "all"


@dataclass(frozen=True)
class Wave:
    """One wave of a plan; exactly one of ``percent``, ``count``, ``selector`` (see docs/rollouts.md).

    ``pause_before``: an operator approves the wave before any of its devices is assigned;
    ``promotion: manual``: an operator approves the *next* wave once this one passed.
    """

    name: str
    percent: float | None = None
    count: int | None = None
    selector: Selector | None = None
    soak: int = 600
    max_failure_rate: float | None = 0.0
    max_failures: int | None = None
    min_reported: int = 1
    timeout: int = 1800
    offline: str = "pending"
    promotion: str = "auto"
    pause_before: bool = False
    on_failure: str = "halt"
    gates: tuple[TelemetryGate, ...] = ()


@dataclass(frozen=True)
class Preflight:
    """A rollout's preflight (docs/rollouts.md): every targeted online device plans the release and
    reports, before any is assigned. The first wave starts when at most ``max_refused`` (a share,
    0-1) of the devices that answered would refuse, within ``timeout`` seconds (devices that have not
    answered by then, and offline ones, do not block it); ``approve_after`` still waits for an
    operator's approval of the first wave once it passed."""

    max_refused: float = 0.0
    timeout: int = 300
    approve_after: bool = False


@dataclass(frozen=True)
class RolloutPlan:
    """A parsed rollout plan. ``raw`` is the document as given, which :func:`parse_plan` re-reads."""

    name: str
    waves: tuple[Wave, ...]
    rate_limit_per_minute: int | None = None
    maintenance_windows: tuple[MaintenanceWindow, ...] = ()
    canary_label: str = "canary"
    canary_first: bool = True
    target: Selector | None = None
    description: str = ""
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)
    preflight: Preflight | None = None


@dataclass(frozen=True)
class PlanRef:
    """``rollout: {plan: NAME}`` in fleet.yaml: the default plan is ``rollouts/NAME.yaml``."""

    name: str


def _mapping(value: object, where: Where, allowed: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{what} must be a mapping", where)
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise PlanError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})",
                          (*where, unknown[0]))
    return value


def _duration(value: object, where: Where, *, allow_zero: bool) -> int:
    if allow_zero and not isinstance(value, bool) and (value == 0 or (isinstance(value, str)
                                                                      and _ZERO.match(value.strip()))):
        return 0
    return parse_duration(value, where, maximum=_MAX_DURATION)


def _int(value: object, where: Where, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError("must be a whole number", where)
    if value < minimum:
        raise PlanError(f"must be at least {minimum}", where)
    return value


def _number(value: object, where: Where, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError("must be a number", where)
    if not low <= value <= high:
        raise PlanError(f"must be from {low:g} to {high:g}", where)
    return float(value)


def _choice(value: object, where: Where, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PlanError(f"must be one of {', '.join(choices)}", where)
    return str(value)


def _name(value: object, where: Where) -> str:
    if not isinstance(value, str) or not PLAN_NAME.match(value):
        raise PlanError("a name must be 1-64 letters, digits, '_', '.' or '-'", where)
    return value


def _parse_gate(raw: object, where: Where) -> TelemetryGate:
    g = _mapping(raw, where, _GATE_KEYS, "a telemetry gate")
    metric = g.get("metric")
    if not isinstance(metric, str) or not (metric in GATE_METRICS or (metric.startswith("check:")
                                                                      and len(metric) > 6)):
        raise PlanError(f"metric must be one of {', '.join(GATE_METRICS)} or check:<name>",
                          (*where, "metric"))
    is_check = metric.startswith("check:")
    op = _choice(g.get("op", ">=" if is_check else None), (*where, "op"), GATE_OPS)
    if "value" not in g and not is_check:
        raise PlanError("'value' is required", (*where, "value"))
    value = _number(g.get("value", 1), (*where, "value"), -1e12, 1e12)
    raw_for = g.get("for_devices", "all")
    for_devices: str | float
    if raw_for in ("any", "all"):
        for_devices = str(raw_for)
    elif isinstance(raw_for, str) and raw_for.endswith("%"):
        try:
            for_devices = _number(float(raw_for[:-1]), (*where, "for_devices"), 0, 100)
        except ValueError as exc:
            raise PlanError("for_devices must be any, all or a percentage",
                              (*where, "for_devices")) from exc
    elif isinstance(raw_for, int | float) and not isinstance(raw_for, bool):
        for_devices = _number(raw_for, (*where, "for_devices"), 0, 100)
    else:
        raise PlanError("for_devices must be any, all or a percentage", (*where, "for_devices"))
    return TelemetryGate(metric=metric, op=op, value=value, for_devices=for_devices)


def _parse_wave(raw: object, where: Where, index: int, *, canary_first: bool, on_failure: str) -> Wave:
    w = _mapping(raw, where, _WAVE_KEYS, "a wave")
    name = _name(w.get("name", f"wave-{index + 1}"), (*where, "name"))
    rules = [k for k in ("percent", "count", "selector") if w.get(k) is not None]
    if len(rules) > 1:
        raise PlanError(f"a wave takes one of percent, count or selector, not {' and '.join(rules)}", where)
    if not rules and not (index == 0 and canary_first):
        raise PlanError("a wave needs one of percent, count or selector", where)
    percent = None if w.get("percent") is None else _number(w["percent"], (*where, "percent"), 0, 100)
    if percent is not None and percent <= 0:
        raise PlanError("must be more than 0", (*where, "percent"))
    count = None if w.get("count") is None else _int(w["count"], (*where, "count"), 1)
    selector = None if w.get("selector") is None else parse_selector(w["selector"], (*where, "selector"))
    max_rate = w.get("max_failure_rate", 0.0)
    pause_before = w.get("pause_before", False)
    if not isinstance(pause_before, bool):
        raise BundleError("must be true or false", (*where, "pause_before"))
    gates_raw = w.get("gates", [])
    if not isinstance(gates_raw, list):
        raise PlanError("'gates' must be a list", (*where, "gates"))
    return Wave(
        name=name, percent=percent, count=count, selector=selector,
        soak=_duration(w.get("soak", 600), (*where, "soak"), allow_zero=True),
        max_failure_rate=None if max_rate is None else _number(max_rate, (*where, "max_failure_rate"), 0, 1),
        max_failures=(None if w.get("max_failures") is None
                      else _int(w["max_failures"], (*where, "max_failures"), 0)),
        min_reported=_int(w.get("min_reported", 1), (*where, "min_reported"), 1),
        timeout=_duration(w.get("timeout", 1800), (*where, "timeout"), allow_zero=False),
        offline=_choice(w.get("offline", "pending"), (*where, "offline"), OFFLINE_RULES),
        promotion=_choice(w.get("promotion", "auto"), (*where, "promotion"), ("auto", "manual")),
        pause_before=pause_before,
        on_failure=_choice(w.get("on_failure", on_failure), (*where, "on_failure"), ("halt", "rollback")),
        gates=tuple(_parse_gate(g, (*where, "gates", i)) for i, g in enumerate(gates_raw)),
    )


def _parse_window(raw: object, where: Where) -> MaintenanceWindow:
    m = _mapping(raw, where, _WINDOW_KEYS, "a maintenance window")
    if "cron" not in m or "duration" not in m:
        raise PlanError("a maintenance window needs 'cron' and 'duration'", where)
    return MaintenanceWindow(cron=parse_cron(m["cron"], (*where, "cron")),
                             duration=_duration(m["duration"], (*where, "duration"), allow_zero=False))


def _default_name(source: str) -> str:
    stem = PurePosixPath(source).stem if source else ""
    return stem if stem and PLAN_NAME.match(stem) and stem != "fleet" else "default"


def parse_plan(value: object, *, source: str) -> RolloutPlan:
    """Parse one rollout plan (a loaded ``rollouts/<name>.yaml`` or an inline ``rollout:`` plan).

    ``source`` names where it came from (the repo-relative file); it is put on errors and gives
    the plan its default name (the file's stem).

    Raises:
        PlanError: the first problem, with ``where`` and ``file``.
    """
    try:
        return _parse_plan(value, source)
    except PlanError as exc:
        if exc.file or not source:
            raise
        raise PlanError(exc.reason, exc.where, source) from exc
    except BundleError as exc:  # a selector or duration inside the plan, parsed by the shared format
        raise PlanError(exc.reason, exc.where, exc.file or source) from exc


def _parse_plan(value: object, source: str) -> RolloutPlan:
    p = _mapping(value, (), _PLAN_KEYS, "a rollout plan")
    name = _name(p.get("name", _default_name(source)), ("name",))
    description = p.get("description", "")
    if not isinstance(description, str):
        raise PlanError("must be a string", ("description",))
    canary_first = p.get("canary_first", True)
    if not isinstance(canary_first, bool):
        raise PlanError("must be true or false", ("canary_first",))
    canary_label = p.get("canary_label", "canary")
    if not isinstance(canary_label, str) or not canary_label:
        raise PlanError("must be a label name", ("canary_label",))
    rollback = p.get("rollback_on_failure", False)
    if not isinstance(rollback, bool):
        raise PlanError("must be true or false", ("rollback_on_failure",))
    rate = p.get("rate_limit_per_minute")
    windows_raw = p.get("maintenance_windows", [])
    if not isinstance(windows_raw, list):
        raise PlanError("must be a list", ("maintenance_windows",))
    waves_raw = p.get("waves")
    if not isinstance(waves_raw, list) or not waves_raw:
        raise PlanError("a plan needs a non-empty list of waves", ("waves",))
    waves = tuple(_parse_wave(w, ("waves", i), i, canary_first=canary_first,
                              on_failure="rollback" if rollback else "halt") for i, w in enumerate(waves_raw))
    seen: set[str] = set()
    last_percent = 0.0
    for i, wave in enumerate(waves):
        if wave.name in seen:
            raise PlanError(f"duplicate wave name {wave.name!r}", ("waves", i, "name"))
        seen.add(wave.name)
        if wave.percent is not None:
            if wave.percent < last_percent:
                raise PlanError("percent is cumulative and must not decrease from wave to wave",
                                  ("waves", i, "percent"))
            last_percent = wave.percent
    return RolloutPlan(
        name=name, waves=waves,
        rate_limit_per_minute=None if rate is None else _int(rate, ("rate_limit_per_minute",), 1),
        maintenance_windows=tuple(_parse_window(w, ("maintenance_windows", i))
                                  for i, w in enumerate(windows_raw)),
        canary_label=canary_label, canary_first=canary_first,
        target=None if p.get("target") is None else parse_selector(p["target"], ("target",)),
        description=description, source=source, raw=copy.deepcopy(dict(p)),
        preflight=_parse_preflight(p.get("preflight", False)),
    )


def _parse_preflight(value: object) -> Preflight | None:
    if value is False or value is None:
        return None
    if value is True:
        return Preflight()
    p = _mapping(value, ("preflight",), _PREFLIGHT_KEYS, "preflight (true, false or a mapping)")
    approve_after = p.get("approve_after", False)
    if not isinstance(approve_after, bool):
        raise PlanError("must be true or false", ("preflight", "approve_after"))
    return Preflight(max_refused=_number(p.get("max_refused", 0.0), ("preflight", "max_refused"), 0, 1),
                     timeout=_duration(p.get("timeout", 300), ("preflight", "timeout"), allow_zero=False),
                     approve_after=approve_after)


def with_preflight(plan: RolloutPlan) -> RolloutPlan:
    """Return ``plan`` with a preflight (its own, else the defaults): the first wave waits for its
    approval, which the preflight gives when it passes (unless the plan's first wave already waited
    for an operator, who then still approves it after the preflight).

    Raises:
        PlanError: never for a parsed plan (the document is re-read).
    """
    raw = copy.deepcopy(dict(plan.raw))
    rule = raw.get("preflight")
    settings: dict[str, Any] = dict(rule) if isinstance(rule, Mapping) else {}
    waves = [dict(w) for w in raw["waves"]]
    if waves[0].get("pause_before") is True:  # an operator approves the first wave after the preflight
        settings.setdefault("approve_after", True)
    waves[0]["pause_before"] = True
    raw["waves"], raw["preflight"] = waves, settings or True
    return parse_plan(raw, source=plan.source)


def parse_fleet_rollout(value: object, *, source: str = "fleet.yaml") -> PlanRef | RolloutPlan | None:
    """Read the ``rollout:`` value of fleet.yaml: a reference ``{plan: NAME}``, an inline plan, or nothing.

    Errors are located under ``rollout``.

    Raises:
        PlanError: the reference or the inline plan is invalid.
    """
    if value is None or value == {}:
        return None
    if isinstance(value, Mapping) and "plan" in value:
        if set(value) != {"plan"}:
            raise PlanError("'plan' names a plan in rollouts/ and takes no other keys", ("rollout",),
                              source)
        try:
            return PlanRef(_name(value["plan"], ("rollout", "plan")))
        except PlanError as exc:
            raise PlanError(exc.reason, exc.where, source) from exc
    try:
        return _parse_plan(value, "")
    except (PlanError, BundleError) as exc:
        raise PlanError(exc.reason, ("rollout", *exc.where), source) from exc
