"""Adversarial tests: a hostile party at one trust boundary tries to break a guarantee."""
