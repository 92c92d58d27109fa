"""Cron-like maintenance windows: when a rollout may assign a release to a device.

A window is a five-field cron expression (minute, hour, day of month, month, day of week; UTC)
that says when the window *opens*, plus a ``duration`` for how long it stays open. Each field is
``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of those. Day of
week is 0-7 with 0 and 7 both Sunday. As in cron, when both day of month and day of week are
restricted, a day matches when either does.

Pure: no clock reads; callers pass ``now`` as POSIX seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from edge_core.errors import BundleError

__all__ = ["CronSpec", "MaintenanceWindow", "in_any_window", "parse_cron", "window_is_open"]

Where = tuple[str | int, ...]

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))


@dataclass(frozen=True)
class CronSpec:
    """A parsed cron expression: the allowed values of each field (day of week 0-6, Sunday 0)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, day: datetime) -> bool:
        """Tell whether the calendar day of ``day`` is one on which the expression can fire."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow


@dataclass(frozen=True)
class MaintenanceWindow:
    """A window opening whenever ``cron`` fires and staying open ``duration`` seconds."""

    cron: CronSpec
    duration: int


def _parse_field(text: str, name: str, low: int, high: int, where: Where) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                start, end = low, high
            elif "-" in body:
                a, b = body.split("-", 1)
                start, end = int(a), int(b)
            else:
                start = end = int(body)
                if step_text:
                    end = high
        except ValueError as exc:
            raise BundleError(f"cron {name} field {text!r} is not a number, range, step or list",
                              where) from exc
        if step < 1 or start < low or end > high or start > end:
            raise BundleError(f"cron {name} field {text!r} is out of range {low}-{high}", where)
        values.update(range(start, end + 1, step))
    return frozenset(values)


def parse_cron(text: object, where: Where = ()) -> CronSpec:
    """Parse a five-field cron expression (``"0 2 * * 1-5"``).

    Raises:
        BundleError: not a string of five valid fields.
    """
    if not isinstance(text, str) or len(text.split()) != 5:
        raise BundleError(f"{text!r} is not a cron expression of five fields (minute hour day month weekday)",
                          where)
    parts = text.split()
    sets = [_parse_field(p, name, lo, hi, where) for p, (name, lo, hi) in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return CronSpec(text=" ".join(parts), minutes=sets[0], hours=sets[1], days=sets[2], months=sets[3],
                    weekdays=weekdays, days_restricted=parts[2] != "*", weekdays_restricted=parts[4] != "*")


def _last_start(cron: CronSpec, now: datetime, earliest: datetime) -> datetime | None:
    """Return the latest moment in [earliest, now] at which ``cron`` fires, or None."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    while day + timedelta(days=1) > earliest:
        if cron.matches_day(day):
            for hour in sorted(cron.hours, reverse=True):
                for minute in sorted(cron.minutes, reverse=True):
                    moment = day.replace(hour=hour, minute=minute)
                    if moment > now:
                        continue
                    return moment if moment >= earliest else None
        day -= timedelta(days=1)
    return None


def window_is_open(window: MaintenanceWindow, now: float) -> bool:
    """Tell whether ``window`` is open at ``now`` (POSIX seconds): it fired less than ``duration`` ago."""
    moment = datetime.fromtimestamp(now, UTC)
    earliest = moment - timedelta(seconds=window.duration) + timedelta(microseconds=1)
    return _last_start(window.cron, moment, earliest) is not None


def in_any_window(windows: Sequence[MaintenanceWindow], now: float) -> bool:
    """Tell whether assignments are allowed at ``now``: no windows at all, or one of them is open."""
    return not windows or any(window_is_open(w, now) for w in windows)
