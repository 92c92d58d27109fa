"""The rollout engine's cost per step, in process, beside the fleet size: is a step O(what changed)?

    .venv/bin/python -m bench.bench_rollout_engine [--devices 10000 100000] [--repeat 2000]

For each fleet size: a 4-wave rollout (percent 1/10/50/100, zero soak, no rate limit) is started
with every device online, the first wave is answered, and the second wave assigned. Then it times
``step()`` for

* ``heartbeat_noop_us``: a report that changes nothing (a device of a later wave, ``applied`` on
  the release it already runs: what every ordinary heartbeat amounts to);
* ``success_report_us``: a device of the current wave reporting ``applied`` (one change);
* ``tick_us``: a ``Tick`` with nothing due;
* ``first_step_after_load_ms``: the first step of a state just read back with ``from_dict`` (it
  builds the index: the one O(fleet) step);
* ``to_dict_devices_ms``: serialising the whole device map (what the runner no longer does per tick).

Prints JSON. The growth from the smaller to the larger fleet is what matters: a step that costs
O(fleet) grows tenfold from 10,000 to 100,000 devices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet_server.rollouts.engine import (
    AssignRelease,
    DeviceReport,
    ReleaseRef,
    RolloutState,
    Start,
    Tick,
    new_rollout,
    step,
)
from fleet_server.rollouts.membership import DeviceInfo
from fleet_server.rollouts.plan import parse_plan

__all__ = ["main", "measure"]

NEW, OLD = ReleaseRef(2, "2" * 40), ReleaseRef(1, "1" * 40)
T0 = 1_700_000_000.0


def _per_call_us(fn: Any, repeat: int) -> float:
    start = time.perf_counter()
    for i in range(repeat):
        fn(i)
    return round((time.perf_counter() - start) / repeat * 1e6, 2)


def measure(devices: int, repeat: int) -> dict[str, Any]:
    """Build a ``devices``-device rollout in its second wave and time single steps on it."""
    plan = parse_plan({"waves": [{"percent": p, "soak": 0, "timeout": 3600} for p in (1, 10, 50, 100)]},
                      source="bench.yaml")
    fleet = [DeviceInfo(f"dev-{i:06d}", {}) for i in range(devices)]
    t = time.perf_counter()
    state = new_rollout("bench", plan, release=NEW, previous=OLD, devices=fleet, now=T0)
    state, effects = step(state, Start(now=T0))
    now = T0 + 1
    for effect in list(effects):  # the first wave applies: the second is assigned
        if isinstance(effect, AssignRelease):
            state, more = step(state, DeviceReport(effect.device, now, "applied", NEW.version))
            effects.extend(more)
            now += 1e-3
    setup_s = time.perf_counter() - t
    assert state.wave == 1, state.wave
    current = [e.device for e in effects if isinstance(e, AssignRelease) and state.devices[e.device].wave == 1]
    later = [d for d, s in state.devices.items() if s.wave == 3]
    holder = {"state": state, "now": now}

    def noop(i: int) -> None:
        holder["now"] += 1e-3
        device = later[i % len(later)]
        holder["state"], _ = step(holder["state"], DeviceReport(device, holder["now"], "applied", OLD.version))

    def success(i: int) -> None:
        holder["now"] += 1e-3
        holder["state"], _ = step(holder["state"], DeviceReport(current[i % len(current)], holder["now"],
                                                                "applied", NEW.version))

    def tick(_i: int) -> None:
        holder["now"] += 1e-3
        holder["state"], _ = step(holder["state"], Tick(holder["now"]))

    out: dict[str, Any] = {"devices": devices, "setup_seconds": round(setup_s, 2)}
    out["heartbeat_noop_us"] = _per_call_us(noop, repeat)
    out["success_report_us"] = _per_call_us(success, min(repeat, len(current)))
    out["tick_us"] = _per_call_us(tick, repeat)
    data = holder["state"].to_dict()
    t = time.perf_counter()
    data = holder["state"].to_dict()
    out["to_dict_devices_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    loaded = RolloutState.from_dict(data)
    t = time.perf_counter()
    step(loaded, Tick(holder["now"] + 1))
    out["first_step_after_load_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each fleet size and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args(argv)
    results = [measure(n, args.repeat) for n in args.devices]
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
