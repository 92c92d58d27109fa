"""The reliability suite: faults injected on purpose (power loss, broker outage, flaky mirror, herds)."""
