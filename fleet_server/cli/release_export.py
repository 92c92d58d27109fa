"""``fleetctl release export REPO_DIR --out FILE``: a signed release as one file for a device without a
mirror (``edge-agent import FILE``).

The file is a ``git bundle`` (``git help bundle``) of the release commit with its history, so it
needs nothing on the device and ``git bundle verify FILE`` checks it anywhere. The commit must hold
a signed manifest (``.fleet/release.json``); with ``--trust`` the release is verified first exactly
as a device verifies it (the same verifier). The bundle carries one reference,
``refs/edge-fleet/export``, made for the export in the operator's repository and removed after it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_core.errors import EdgeFleetError
from edge_core.source import Source
from edge_core.trust.verify import TrustRoot, verify_tree
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, emit
from fleet_server.errors import UsageError

__all__ = ["EXPORT_REF", "add_export", "export_release", "resolve_commit"]

EXPORT_REF = "refs/edge-fleet/export"
"""The one reference an exported bundle carries."""
_MANIFEST = ".fleet/release.json"
_GIT_TIMEOUT = 300.0
_EXAMPLES = """examples:
  fleetctl release export ./fleet-repo --out /media/usb/release.bundle
  fleetctl release export ./fleet-repo --rev v7 --out release-7.bundle --trust "$(cat ops.pub)" --json
  # on the device:  edge-agent import /media/usb/release.bundle
"""


def _git(repo: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise UsageError("fleetctl release export needs git on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise UsageError(f"git {args[0]} did not finish within {_GIT_TIMEOUT:.0f}s") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UsageError(f"git {args[0]} in {repo}: {last}")
    return proc.stdout


def resolve_commit(repo: Path, rev: str) -> str:
    """Return the full sha of the commit ``rev`` names in the repository ``repo``.

    Raises:
        UsageError: no repository there, or no such commit.
    """
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    except UsageError as exc:
        raise UsageError(f"no commit {rev!r} in {repo}") from exc


def export_release(repo: Path, out: Path, *, rev: str = "HEAD", trust: TrustRoot | None = None,
                   now: datetime | None = None) -> dict[str, Any]:
    """Write the release commit ``rev`` of ``repo`` with its history to the bundle ``out``; return
    its summary (commit, version, bytes, verified).

    Raises:
        UsageError: no such repository or revision, no signed manifest in it, git failed, or ``out``
            exists.
        EdgeFleetError: with ``trust``, the release fails verification (the device's reason).
    """
    if out.exists():
        raise UsageError(f"{out} exists: choose another --out")
    commit = resolve_commit(repo, rev)
    try:
        manifest = json.loads(_git(repo, "show", f"{commit}:{_MANIFEST}"))
    except UsageError as exc:
        raise UsageError(f"{rev} ({commit[:12]}) holds no signed release ({_MANIFEST}): "
                         "sign it first with fleetctl release sign") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{rev} ({commit[:12]}): {_MANIFEST} is not JSON") from exc
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if trust is not None:
        with tempfile.TemporaryDirectory(prefix="fleetctl-export-") as cache, \
                Source(str(repo.resolve()), "main", Path(cache) / "repo") as source:
            source.fetch(commit)
            release, _ = verify_tree(source.read_tree(commit), trust, now=now or datetime.now(UTC), floor=0)
            version = release.version
    _git(repo, "update-ref", EXPORT_REF, commit)
    try:
        _git(repo, "bundle", "create", str(out.resolve()), EXPORT_REF)
    finally:
        _git(repo, "update-ref", "-d", EXPORT_REF)
    return {"commit": commit, "version": version, "file": str(out), "bytes": out.stat().st_size,
            "verified": trust is not None}


def _run_export(args: argparse.Namespace) -> int:
    trust = TrustRoot(frozenset(args.trust), threshold=args.threshold) if args.trust else None
    try:
        summary = export_release(args.repo_dir, args.out, rev=args.rev, trust=trust)
    except EdgeFleetError as exc:
        raise UsageError(f"release {args.rev} fails verification: {exc}") from exc
    text = (f"exported release {summary['version']} ({summary['commit'][:12]}) to {summary['file']}, "
            f"{summary['bytes']} bytes" + (", verified" if summary["verified"] else ""))
    emit(summary, text, as_json=args.json)
    return 0


def add_export(sub: Any) -> None:
    """Add ``fleetctl release export`` to the ``release`` sub-commands."""
    export = sub.add_parser(
        "export", help="write a signed release to one file for a device without a mirror",
        description="Write the release commit (--rev, default HEAD) of REPO_DIR with its history to a "
                    "git bundle file, for `edge-agent import FILE` on a device without a mirror. "
                    "With --trust the release is verified first as a device would.",
        epilog=_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    export.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="the bundle file to write")
    export.add_argument("--rev", default="HEAD", metavar="REV", help="the release commit (default HEAD)")
    export.add_argument("--trust", action="append", metavar="PUBKEY",
                        help="verify with this trusted ed25519 public key first (repeat)")
    export.add_argument("--threshold", type=int, default=1, metavar="K",
                        help="how many trusted keys must sign (default 1)")
    add_json_option(export, "print a JSON object")
    export.set_defaults(func=_run_export)
