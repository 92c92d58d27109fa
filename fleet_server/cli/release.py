"""`fleetctl release`: sign a config repo as a release, co-sign it, verify it as a device would.

``release list`` and ``release show N`` (what the fleet server recorded) live in
:mod:`fleet_server.cli.history`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edge_core.durations import parse_cli_seconds
from edge_core.errors import EdgeFleetError
from edge_core.trust.manifest import MAX_MESSAGE_CHARS, format_time
from edge_core.trust.verify import TrustRoot, VerifiedRelease
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, emit, print_json
from fleet_server.cli.history import add_release_history
from fleet_server.cli.keys import load_signing_keys
from fleet_server.cli.lint import default_profile_dirs
from fleet_server.cli.release_diff import add_diff
from fleet_server.cli.release_export import add_export
from fleet_server.errors import LintFailed, UsageError
from fleet_server.lint import lint_repo
from fleet_server.signing import cosign_release, sign_release, verify_repo

__all__ = ["NO_LINT_NOTE", "parse_duration", "register"]

_MAX_EXPIRY = timedelta(days=3660)
NO_LINT_NOTE = "[signed with --no-lint: not linted]"
"""Prefixed to the signed manifest's ``message`` when ``release sign --no-lint`` is used."""

_SIGN_EXAMPLES = """examples:
  fleetctl release sign config/ --key ~/.config/edge-fleet/keys/alice.key --expires 30d --message "nginx 1.25"
  fleetctl release sign config/ --key a.key --key b.key --expires 12h      # two signers at once
  fleetctl release sign config/ --key a.key --floor 12                      # retire releases below 12
  fleetctl release sign config/ --key a.key --no-lint --message "hotfix"   # emergency: recorded
"""
_COSIGN_EXAMPLES = """examples:
  fleetctl release cosign config/ --key ~/.config/edge-fleet/keys/bob.key
"""
_VERIFY_EXAMPLES = """examples:
  fleetctl release verify config/ --trust ed25519:A --trust ed25519:B --threshold 2
  fleetctl release verify config/ --trust ed25519:A --json
"""


def parse_duration(text: str, option: str = "--expires") -> timedelta:
    """Parse a command-line duration with a unit, such as ``90m``, ``12h``, ``3d`` or ``2w``.

    Raises:
        UsageError: a bare number, not a duration, zero, or longer than ten years; the reason
            starts with ``option``.
    """
    try:
        value = timedelta(seconds=parse_cli_seconds(text))
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from exc
    if value <= timedelta(0):
        raise UsageError(f"{option}: must be more than zero, not {text!r}")
    if value > _MAX_EXPIRY:
        raise UsageError(f"{option}: {text!r} is longer than ten years")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``release sign|cosign|verify|list|show`` to the fleetctl parser."""
    release = subparsers.add_parser(
        "release", help="sign and verify releases; list what the fleet server recorded",
        description="Sign a config repo as a release and verify it; list and show the releases the "
                    "fleet server recorded.",
        epilog=_SIGN_EXAMPLES + _VERIFY_EXAMPLES.removeprefix("examples:\n")
        + "  fleetctl release list --limit 5\n  fleetctl release show 12\n",
        formatter_class=ExamplesHelpFormatter)
    sub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)

    sign = sub.add_parser(
        "sign", help="write a signed release manifest (.fleet/release.json)",
        description="Lint REPO_DIR as 'fleetctl lint' does and refuse on any error; then list every "
                    "file of REPO_DIR with its SHA-256 and size in .fleet/release.json and sign it. In "
                    "a git work tree the files are those git tracks or would track.",
        epilog=_SIGN_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    sign.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    _add_key_option(sign)
    sign.add_argument("--expires", default="30d", metavar="DURATION",
                      help="how long devices accept the release, with a unit: 90m, 12h, 3d, 30d "
                           "(default), 2w; a bare number is refused")
    sign.add_argument("--version", type=int, metavar="N", dest="release_version",
                      help="release version (default: previous + 1)")
    sign.add_argument("--floor", type=int, metavar="N",
                      help="rollback floor: devices refuse versions below it afterwards (default: previous)")
    sign.add_argument("--message", metavar="M", help="a note stored in the signed manifest")
    sign.add_argument("--profiles", metavar="DIR", type=Path, action="append", default=None,
                      help="a device-profile directory for the lint (repeatable; as 'fleetctl lint')")
    sign.add_argument("--no-lint", action="store_true",
                      help="emergencies only: sign without linting; the signed message records it")
    add_json_option(sign, "print a JSON object")
    sign.set_defaults(func=run_sign)

    cosign = sub.add_parser(
        "cosign", help="add signatures to the existing manifest (k-of-n)",
        description="Add the signatures of more keys to .fleet/release.json without changing what it "
                    "lists. Refused if the working tree no longer matches the manifest.",
        epilog=_COSIGN_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    cosign.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    _add_key_option(cosign)
    add_json_option(cosign, "print a JSON object")
    cosign.set_defaults(func=run_cosign)

    verify = sub.add_parser(
        "verify", help="verify the manifest and the files as a device would",
        description="Verify .fleet/release.json against the trusted keys (after walking the root "
                    "rotations in .fleet/root/, starting from the given keys as root version 1) and "
                    "check that the repo's files match it exactly.",
        epilog=_VERIFY_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    verify.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    verify.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                        help="a trusted ed25519 public key (repeat)")
    verify.add_argument("--threshold", type=int, default=1, metavar="K",
                        help="how many trusted keys must sign (default 1)")
    verify.add_argument("--floor", type=int, default=0, metavar="N",
                        help="refuse versions below this rollback floor (default 0)")
    add_json_option(verify, "print a JSON object")
    verify.set_defaults(func=run_verify)
    add_release_history(sub)
    add_export(sub)
    add_diff(sub)


def _add_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", action="append", required=True, type=Path, metavar="KEYFILE",
                        help="an ed25519 private key file to sign with (repeat)")


def _summary(release: VerifiedRelease) -> dict[str, Any]:
    return {"version": release.version, "rollback_floor": release.rollback_floor,
            "created": format_time(release.created), "expires": format_time(release.expires),
            "files": len(release.files), "signers": sorted(release.signers), "message": release.message}


def _text(verb: str, release: VerifiedRelease, suffix: str = "") -> str:
    text = (f"{verb} release {release.version} ({len(release.files)} files, floor "
            f"{release.rollback_floor}), expires {format_time(release.expires)}, signed by "
            f"{', '.join(sorted(release.signers))}{suffix}")
    return text + (f"\nmessage: {release.message}" if release.message else "")


def lint_before_signing(repo: Path, profile_dirs: list[Path] | None) -> None:
    """Lint ``repo`` as ``fleetctl lint`` does; refuse when it finds an error.

    Warnings do not stop signing and are not printed here (``fleetctl lint`` lists them).

    Raises:
        UsageError: ``repo`` is not a directory.
        LintFailed: at least one problem is an error (each error, as FILE:LINE: error: REASON, and
            the refusal are printed on stderr).
    """
    if not repo.is_dir():
        raise UsageError(f"{repo} is not a directory")
    problems = lint_repo(repo, profile_dirs or default_profile_dirs())
    errors = 0
    for p in problems:
        if p.severity == "error":
            errors += 1
            sys.stderr.write(f"{p.file}:{p.line}: error: {p.reason}\n")
    if errors:
        sys.stderr.write(f"fleetctl: not signed: {repo} has {errors} lint error(s); fix them (see "
                         "'fleetctl lint'), or in an emergency sign with --no-lint, which the signed "
                         "manifest records\n")
        raise LintFailed(f"{errors} lint error(s)")


def _message_with_note(message: str | None) -> str:
    """Return ``message`` behind the --no-lint note.

    Raises:
        UsageError: the note and the message together are over the manifest's message limit.
    """
    text = NO_LINT_NOTE if not message else f"{NO_LINT_NOTE} {message}"
    if len(text) > MAX_MESSAGE_CHARS:
        raise UsageError(f"--message is too long: with the --no-lint note it must fit in {MAX_MESSAGE_CHARS} "
                         "characters")
    return text


def run_sign(args: argparse.Namespace) -> int:
    """Lint the repo (unless ``--no-lint``), sign it as a new release, print a summary; return the code."""
    expires = parse_duration(args.expires)
    keys = load_signing_keys(args.key)
    message = args.message
    if args.no_lint:
        message = _message_with_note(message)
        sys.stderr.write("fleetctl: warning: signing without lint (--no-lint); the signed manifest's "
                         f"message records it: {NO_LINT_NOTE}\n")
    else:
        lint_before_signing(args.repo_dir, args.profiles)
    release = sign_release(args.repo_dir, keys, expires=expires, now=datetime.now(UTC),
                           version=args.release_version, floor=args.floor, message=message)
    emit(_summary(release), _text("signed", release), as_json=args.json)
    return 0


def run_cosign(args: argparse.Namespace) -> int:
    """Add signatures to the repo's manifest and print a summary; return the exit code."""
    keys = load_signing_keys(args.key)
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
    emit(summary, _text("verified", release, f" (trust root version {used.version})"), as_json=args.json)
    return 0
