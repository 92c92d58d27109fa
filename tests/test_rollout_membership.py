"""Deterministic membership: hash order, canaries, percent/count/selector waves, devices that join."""

from __future__ import annotations

import hashlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts.membership import (
    NOT_TARGETED,
    DeviceInfo,
    assign_waves,
    hash_key,
    order_devices,
    wave_of_new_device,
)
from fleet_server.rollouts.plan import RolloutPlan, parse_plan


def _plan(waves: list[dict[str, object]], **extra: object) -> RolloutPlan:
    return parse_plan({"waves": waves, **extra}, source="rollouts/test.yaml")


def _fleet(n: int, canaries: int = 0) -> list[DeviceInfo]:
    return [DeviceInfo(id=f"dev-{i:03d}", labels={"canary": "true"} if i < canaries else {"site": "a"})
            for i in range(n)]


def test_order_is_sha256_of_rollout_and_device() -> None:
    ids = ["b", "a", "c", "a"]
    assert order_devices(ids, "r1") == ['a', 'c', 'b']
    # Pinned values: the order must not change across Python versions or restarts.
    assert hash_key("a", "r1") == "2355d9fe69c3496e6ca0b01a0d112200cd1f7ced228e7a3cb9d3b78fdc09d4e8"
    expected = sorted({"a", "b", "c"}, key=lambda d: hashlib.sha256(f"r2\0{d}".encode()).hexdigest())
    assert order_devices(ids, "r2") == expected


def test_same_input_same_waves_in_any_order() -> None:
    plan = _plan([{"percent": 10}, {"percent": 50}, {"percent": 100}])
    fleet = _fleet(40)
    shuffled = list(fleet)
    random.Random(7).shuffle(shuffled)
    assert assign_waves(plan, fleet, "r1") == assign_waves(plan, shuffled, "r1")


def test_percent_is_cumulative_and_follows_hash_order() -> None:
    plan = _plan([{"percent": 10}, {"percent": 50}, {"percent": 100}], canary_first=False)
    fleet = _fleet(40)
    placed = assign_waves(plan, fleet, "r1")
    sizes = [sum(1 for w in placed.values() if w == k) for k in range(3)]
    assert sizes == [4, 16, 20]
    order = order_devices([d.id for d in fleet], "r1")
    assert [placed[d] for d in order] == sorted(placed[d] for d in order)


def test_percent_rounds_up_so_a_small_fleet_still_gets_a_canary() -> None:
    plan = _plan([{"percent": 1}, {"percent": 100}], canary_first=False)
    placed = assign_waves(plan, _fleet(20), "r1")
    assert sum(1 for w in placed.values() if w == 0) == 1


def test_canaries_fill_the_first_wave_and_count_toward_it() -> None:
    plan = _plan([{"count": 3}, {"percent": 100}])
    fleet = _fleet(20, canaries=2)
    placed = assign_waves(plan, fleet, "r1")
    first = sorted(d for d, w in placed.items() if w == 0)
    assert len(first) == 3
    assert {"dev-000", "dev-001"} <= set(first)


def test_first_wave_may_be_canaries_only() -> None:
    plan = _plan([{"name": "canary"}, {"percent": 100}])
    placed = assign_waves(plan, _fleet(10, canaries=2), "r1")
    assert sorted(d for d, w in placed.items() if w == 0) == ["dev-000", "dev-001"]


def test_selector_count_and_last_wave_takes_the_rest() -> None:
    plan = _plan([{"selector": {"labels": {"site": "b"}}}, {"count": 2},
                  {"selector": {"labels": {"x": "y"}}}], canary_first=False)
    fleet = [*_fleet(6), DeviceInfo("b-1", {"site": "b"}), DeviceInfo("b-2", {"site": "b"})]
    placed = assign_waves(plan, fleet, "r1")
    assert {d for d, w in placed.items() if w == 0} == {"b-1", "b-2"}
    assert sum(1 for w in placed.values() if w == 1) == 2
    assert sum(1 for w in placed.values() if w == 2) == 4


def test_target_limits_the_fleet() -> None:
    plan = _plan([{"percent": 100}], target={"labels": {"site": "b"}})
    fleet = [*_fleet(3), DeviceInfo("b-1", {"site": "b"})]
    assert assign_waves(plan, fleet, "r1") == {"b-1": 0}
    assert wave_of_new_device(plan, DeviceInfo("z", {"site": "q"}), "r1", {"b-1": 0}) == NOT_TARGETED


def test_new_device_keeps_existing_members_and_follows_its_hash_neighbour() -> None:
    plan = _plan([{"percent": 10}, {"percent": 50}, {"percent": 100}], canary_first=False)
    fleet = _fleet(40)
    placed = assign_waves(plan, fleet, "r1")
    newcomers = [DeviceInfo(f"new-{i}") for i in range(30)]
    for device in newcomers:
        wave = wave_of_new_device(plan, device, "r1", placed)
        order = order_devices([*placed, device.id], "r1")
        pos = order.index(device.id)
        expected = placed[order[pos - 1]] if pos > 0 else 0
        assert wave == expected
    # a canary joins the first wave, a known device keeps its wave
    plan_c = _plan([{"percent": 10}, {"percent": 100}])
    assert wave_of_new_device(plan_c, DeviceInfo("c", {"canary": "true"}), "r1", placed) == 0
    assert wave_of_new_device(plan, fleet[5], "r1", placed) == placed[fleet[5].id]


def test_new_device_matching_a_selector_wave_joins_it() -> None:
    plan = _plan([{"selector": {"labels": {"site": "b"}}}, {"percent": 100}], canary_first=False)
    placed = assign_waves(plan, _fleet(5), "r1")
    assert wave_of_new_device(plan, DeviceInfo("b-9", {"site": "b"}), "r1", placed) == 0
    assert wave_of_new_device(plan, DeviceInfo("a-9", {"site": "a"}), "r1", placed) == 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 60), extra=st.integers(1, 10), rollout=st.text(min_size=1, max_size=8))
def test_adding_devices_never_moves_existing_members(n: int, extra: int, rollout: str) -> None:
    plan = _plan([{"percent": 5}, {"count": 4}, {"percent": 60}, {"percent": 100}])
    fleet = _fleet(n, canaries=min(n, 2))
    placed = assign_waves(plan, fleet, rollout)
    assert set(placed) == {d.id for d in fleet}
    grown = dict(placed)
    for i in range(extra):
        device = DeviceInfo(f"late-{i}")
        grown[device.id] = wave_of_new_device(plan, device, rollout, grown)
        assert 0 <= grown[device.id] < len(plan.waves)
    assert {d: grown[d] for d in placed} == placed
