"""Backoff: full-jitter delays within their ceilings, capped, resettable, reproducible."""

from __future__ import annotations

import random
import statistics

import pytest

from edge_agent.backoff import Backoff


def test_delays_stay_within_the_doubling_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(1))
    for n in range(40):
        ceiling = min(30.0, 0.5 * 2**n)
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        assert backoff.attempt == n + 1


def test_ceiling_is_capped_and_survives_huge_attempt_counts() -> None:
    backoff = Backoff(base=10.0, cap=300.0, rng=random.Random(2))
    delays = [backoff.next_delay() for _ in range(2000)]
    assert max(delays) <= 300.0
    assert backoff.ceiling() == 300.0
    # Once capped, the delays spread over the whole [0, cap] range.
    assert max(delays[-500:]) > 250.0


def test_reset_starts_over() -> None:
    backoff = Backoff(base=1.0, cap=100.0, rng=random.Random(3))
    for _ in range(10):
        backoff.next_delay()
    assert backoff.attempt == 10
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.ceiling() == 1.0
    assert backoff.next_delay() <= 1.0


def test_seeded_rng_gives_the_same_sequence() -> None:
    first = Backoff(base=1.0, cap=60.0, rng=random.Random(42))
    second = Backoff(base=1.0, cap=60.0, rng=random.Random(42))
    other = Backoff(base=1.0, cap=60.0, rng=random.Random(43))
    a = [first.next_delay() for _ in range(20)]
    b = [second.next_delay() for _ in range(20)]
    c = [other.next_delay() for _ in range(20)]
    assert a == b
    assert a != c


def test_full_jitter_is_uniform_over_the_ceiling() -> None:
    # 20,000 draws at a fixed ceiling of 8: a uniform distribution on [0, 8] has mean 4 and standard
    # deviation 8/sqrt(12) ~= 2.31; every eighth of the range gets ~1/8 of the draws.
    rng = random.Random(7)
    draws = []
    for _ in range(20_000):
        backoff = Backoff(base=1.0, cap=8.0, rng=rng)
        for _ in range(3):
            backoff.next_delay()
        draws.append(backoff.next_delay())
    assert statistics.fmean(draws) == pytest.approx(4.0, abs=0.1)
    assert statistics.pstdev(draws) == pytest.approx(8 / 12**0.5, abs=0.1)
    buckets = [0] * 8
    for d in draws:
        buckets[min(7, int(d))] += 1
    for count in buckets:
        assert count == pytest.approx(2500, rel=0.1)


@pytest.mark.parametrize(("base", "cap"), [(0.0, 10.0), (-1.0, 10.0), (5.0, 1.0)])
def test_invalid_parameters_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base=base, cap=cap)
