"""The header of a ``git bundle`` file (an air-gapped release, ``fleetctl release export``). Pure.

A bundle is a header, then a pack::

    # v2 git bundle                (or "# v3 git bundle", then "@capability" lines)
    -<sha> <comment>               one line per prerequisite commit (the receiver must have it)
    <sha> <refname>                one line per reference it carries
    <blank line>
    <the pack>

:func:`read_header` reads the header from an open file, bounded in lines and bytes, and leaves the
file at the first byte of the pack, which the caller spools and checks like a fetched one. See
``git help bundle-format``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

from edge_core.errors import FetchError

__all__ = ["MAX_HEADER_LINES", "BundleHeader", "read_header"]

MAX_HEADER_LINES = 1024
"""The most header lines a bundle may have (prerequisites, references and capabilities)."""
_MAX_LINE = 1024
_SIGNATURES = (b"# v2 git bundle\n", b"# v3 git bundle\n")
_SHA_RE = re.compile(rb"^[0-9a-f]{40}$")
_REF_RE = re.compile(rb"^(refs/[A-Za-z0-9._/-]{1,200}|HEAD)$")


@dataclass(frozen=True)
class BundleHeader:
    """What a bundle says it holds: prerequisite commits and references (name -> commit sha)."""

    prerequisites: tuple[str, ...]
    references: dict[str, str]
    capabilities: tuple[str, ...]


def _line(fh: BinaryIO, where: str) -> bytes:
    line = fh.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE or (line and not line.endswith(b"\n")):
        raise FetchError(f"{where}: a bundle header line is too long or cut short")
    if not line:
        raise FetchError(f"{where}: the bundle ends inside its header")
    return line


def read_header(fh: BinaryIO, where: str) -> BundleHeader:
    """Read the bundle header of ``fh`` (``where`` names it in errors); leave ``fh`` at the pack.

    Raises:
        FetchError: not a v2/v3 git bundle, a malformed or over-long header, a capability other
            than ``object-format=sha1``, or no reference.
    """
    if _line(fh, where) not in _SIGNATURES:
        raise FetchError(f"{where}: not a git bundle (v2 or v3)")
    prerequisites: list[str] = []
    references: dict[str, str] = {}
    capabilities: list[str] = []
    for _ in range(MAX_HEADER_LINES):
        line = _line(fh, where).rstrip(b"\n")
        if not line:
            if not references:
                raise FetchError(f"{where}: the bundle carries no reference")
            return BundleHeader(tuple(prerequisites), references, tuple(capabilities))
        if line.startswith(b"@"):
            capability = line[1:].decode("ascii", "replace")
            if capability != "object-format=sha1":
                raise FetchError(f"{where}: unsupported bundle capability {capability[:60]!r}")
            capabilities.append(capability)
        elif line.startswith(b"-"):
            sha = line[1:].split(b" ", 1)[0]
            if not _SHA_RE.match(sha):
                raise FetchError(f"{where}: malformed prerequisite line in the bundle header")
            prerequisites.append(sha.decode("ascii"))
        else:
            sha, _, ref = line.partition(b" ")
            if not _SHA_RE.match(sha) or not _REF_RE.match(ref):
                raise FetchError(f"{where}: malformed reference line in the bundle header")
            references[ref.decode("ascii")] = sha.decode("ascii")
    raise FetchError(f"{where}: the bundle header has more than {MAX_HEADER_LINES} lines")
