"""Operator-only code: building and signing releases, and the every-problem parsers of ``fleetctl lint``.

Nothing here is imported by ``edge_agent``: a device verifies and applies, it never authors.
"""

__all__: list[str] = []
