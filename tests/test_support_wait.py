"""The one bounded wait of the tests (``tests/support/wait.py``)."""

from __future__ import annotations

import pytest

from tests.support.wait import WaitTimeout, wait_until


def test_returns_as_soon_as_the_condition_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    wait_until(third_time, "the third poll", 5.0, 0.001)
    assert len(calls) == 3


def test_raises_a_timeout_naming_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match="waiting for the door to open") as caught:
        wait_until(lambda: False, "the door to open", 0.05, 0.01)
    assert isinstance(caught.value, WaitTimeout)


def test_polls_a_bounded_number_of_times() -> None:
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    with pytest.raises(WaitTimeout):
        wait_until(never, "nothing", 0.1, 0.02)
    assert 1 <= len(calls) <= 0.1 / 0.02 + 2  # the polls plus one last look
