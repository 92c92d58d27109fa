"""Adversarial tests: attacks on the device from a release, an operator repo or a name."""
