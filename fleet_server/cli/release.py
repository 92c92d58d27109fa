"""`fleetctl release`: sign a config repo as a release, co-sign it, verify it as a device would."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edge_agent.durations import parse_seconds
from edge_agent.errors import EdgeFleetError
from edge_agent.trust.keys import load_signing_key
from edge_agent.trust.manifest import format_time
from edge_agent.trust.verify import TrustRoot, VerifiedRelease
from fleet_server.cli.common import emit, print_json
from fleet_server.errors import UsageError
from fleet_server.signing import cosign_release, sign_release, verify_repo

__all__ = ["parse_duration", "register"]

_MAX_EXPIRY = timedelta(days=3660)


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``90m``, ``12h``, ``30d`` or ``2w``.

    Raises:
        UsageError: not a duration, zero, or longer than ten years.
    """
    try:
        value = timedelta(seconds=parse_seconds(text))
    except ValueError as exc:
        raise UsageError(f"duration {exc}, such as 90m, 12h, 30d or 2w") from exc
    if value <= timedelta(0):
        raise UsageError(f"duration must be positive, not {text!r}")
    if value > _MAX_EXPIRY:
        raise UsageError(f"duration {text} is longer than ten years")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``release sign|cosign|verify`` to the fleetctl parser."""
    release = subparsers.add_parser("release", help="sign and verify releases",
                                    description="Sign a config repo as a release and verify it.")
    sub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)

    sign = sub.add_parser(
        "sign", help="write a signed release manifest (.fleet/release.json)",
        description="List every file of REPO_DIR with its SHA-256 and size in .fleet/release.json and "
                    "sign it. In a git work tree the files are those git tracks or would track.")
    sign.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    _add_key_option(sign)
    sign.add_argument("--expires", default="30d", metavar="DURATION",
                      help="how long devices accept the release: 90m, 12h, 30d (default), 2w")
    sign.add_argument("--version", type=int, metavar="N", dest="release_version",
                      help="release version (default: previous + 1)")
    sign.add_argument("--floor", type=int, metavar="N",
                      help="rollback floor: devices refuse versions below it afterwards (default: previous)")
    sign.add_argument("--message", metavar="M", help="a note stored in the signed manifest")
    sign.add_argument("--json", action="store_true", help="print a JSON object")
    sign.set_defaults(func=run_sign)

    cosign = sub.add_parser(
        "cosign", help="add signatures to the existing manifest (k-of-n)",
        description="Add the signatures of more keys to .fleet/release.json without changing what it "
                    "lists. Refused if the working tree no longer matches the manifest.")
    cosign.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    _add_key_option(cosign)
    cosign.add_argument("--json", action="store_true", help="print a JSON object")
    cosign.set_defaults(func=run_cosign)

    verify = sub.add_parser(
        "verify", help="verify the manifest and the files as a device would",
        description="Verify .fleet/release.json against the trusted keys (after walking the root "
                    "rotations in .fleet/root/, starting from the given keys as root version 1) and "
                    "check that the repo's files match it exactly.")
    verify.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    verify.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                        help="a trusted ed25519 public key (repeat)")
    verify.add_argument("--threshold", type=int, default=1, metavar="K",
                        help="how many trusted keys must sign (default 1)")
    verify.add_argument("--floor", type=int, default=0, metavar="N",
                        help="refuse versions below this rollback floor (default 0)")
    verify.add_argument("--json", action="store_true", help="print a JSON object")
    verify.set_defaults(func=run_verify)


def _add_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", action="append", required=True, type=Path, metavar="KEYFILE",
                        help="an ed25519 private key file to sign with (repeat)")


def _summary(release: VerifiedRelease) -> dict[str, Any]:
    return {"version": release.version, "rollback_floor": release.rollback_floor,
            "created": format_time(release.created), "expires": format_time(release.expires),
            "files": len(release.files), "signers": sorted(release.signers), "message": release.message}


def _text(verb: str, release: VerifiedRelease) -> str:
    return (f"{verb} release {release.version} ({len(release.files)} files, floor "
            f"{release.rollback_floor}), expires {format_time(release.expires)}, signed by "
            f"{', '.join(sorted(release.signers))}")


def run_sign(args: argparse.Namespace) -> int:
    """Sign the repo as a new release and print a summary; return the exit code."""
    expires = parse_duration(args.expires)
    keys = [load_signing_key(path) for path in args.key]
    release = sign_release(args.repo_dir, keys, expires=expires, now=datetime.now(UTC),
                           version=args.release_version, floor=args.floor, message=args.message)
    emit(_summary(release), _text("signed", release), as_json=args.json)
    return 0


def run_cosign(args: argparse.Namespace) -> int:
    """Add signatures to the repo's manifest and print a summary; return the exit code."""
    keys = [load_signing_key(path) for path in args.key]
    release = cosign_release(args.repo_dir, keys, now=datetime.now(UTC))
    emit(_summary(release), _text("co-signed", release), as_json=args.json)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Verify the repo's release and files; print the result; return the exit code."""
    trust = TrustRoot(frozenset(args.trust), threshold=args.threshold)
    try:
        release, used = verify_repo(args.repo_dir, trust, now=datetime.now(UTC), floor=args.floor)
    except (EdgeFleetError, UsageError) as exc:
        if args.json:
            print_json({"ok": False, "error": type(exc).__name__, "reason": str(exc)})
        sys.stderr.write(f"fleetctl: {exc}\n")
        return 1
    summary = _summary(release) | {"ok": True, "trust_root_version": used.version}
    emit(summary, _text("verified", release) + f" (trust root version {used.version})", as_json=args.json)
    return 0
