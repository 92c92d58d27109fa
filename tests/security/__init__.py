"""Adversarial tests: a hostile party at one trust boundary (mirror, release, device filesystem,
broker, HTTP, config files) tries to break a guarantee."""
