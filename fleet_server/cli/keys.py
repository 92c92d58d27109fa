"""`fleetctl keys`: generate key files, show a key file's public key, rotate the trusted root keys."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_core.errors import KeyFileError
from edge_core.trust.keys import (
    ED25519_PREFIX,
    X25519_PREFIX,
    SigningKey,
    format_encryption_public,
    format_verify_key,
    generate_encryption_key,
    generate_signing_key,
    load_encryption_key,
    load_signing_key,
)
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, emit
from fleet_server.signing import rotate_root

__all__ = ["load_signing_keys", "register"]

_X25519_PRIVATE = b"x25519-private:"
_HEAD_BYTES = 64
_NEEDED = "signing needs an ed25519 private key file (fleetctl keys generate --out FILE)"
_KINDS = (
    (_X25519_PRIVATE, "an x25519 private key (a device or escrow key for sealed secrets)"),
    (ED25519_PREFIX.encode(), "an ed25519 public key, not the private key file it was printed from"),
    (X25519_PREFIX.encode(), "an x25519 public key (a device's sealed-secret key)"),
)

_GENERATE_EXAMPLES = """examples:
  fleetctl keys generate --out ~/.config/edge-fleet/keys/alice.key     # an ed25519 release signing key
  fleetctl keys generate --out device.key --type x25519     # a key that receives sealed secrets
  fleetctl keys generate --out ~/.config/edge-fleet/keys/alice.key --force   # the old key is lost
"""
_PUBLIC_EXAMPLES = """examples:
  fleetctl keys public ~/.config/edge-fleet/keys/alice.key   # ed25519:<base64>, for --trust
  fleetctl keys public /etc/edge-agent/device.key --json
"""
_ROTATE_EXAMPLES = """examples:
  # genesis: the key set the devices are configured with
  fleetctl keys rotate config/ --trust ed25519:A --trust ed25519:B --threshold 2 --key a.key --key b.key
  # rotation: signed by 2 of the current keys and 2 of the new ones
  fleetctl keys rotate config/ --trust ed25519:B --trust ed25519:C --threshold 2 \\
      --key a.key --key b.key --key c.key
"""


def _more(examples: str) -> str:
    return examples.removeprefix("examples:\n")


def _head(path: Path) -> bytes:
    """Return the first bytes of the file at ``path`` (empty when unreadable: loading says why)."""
    try:
        with Path(path).open("rb") as fh:
            return fh.read(_HEAD_BYTES).lstrip()
    except OSError:
        return b""


def load_signing_keys(paths: Sequence[Path]) -> list[SigningKey]:
    """Load each ed25519 private key file of ``paths``, in order.

    Raises:
        KeyFileError: a file is missing, unsafe or malformed, or holds another kind of key (the
            reason names the kind found and the kind needed).
    """
    keys: list[SigningKey] = []
    for path in paths:
        head = _head(path)
        for prefix, kind in _KINDS:
            if head.startswith(prefix):
                raise KeyFileError(f"{path} holds {kind}; {_NEEDED}")
        keys.append(load_signing_key(path))
    return keys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys generate|public|rotate`` to the fleetctl parser."""
    examples = _GENERATE_EXAMPLES + _more(_PUBLIC_EXAMPLES) + _more(_ROTATE_EXAMPLES)
    keys = subparsers.add_parser("keys", help="generate and rotate signing keys",
                                 description="Generate key files, show public keys, rotate root keys.",
                                 epilog=examples, formatter_class=ExamplesHelpFormatter)
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    gen = sub.add_parser("generate", help="create a private key file (0600) and print its public key",
                         description="Create a private key file (mode 0600) and print its public key. "
                                     "An existing file is kept unless --force is given.",
                         epilog=_GENERATE_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    gen.add_argument("--out", required=True, type=Path, metavar="KEYFILE", help="where to write the key")
    gen.add_argument("--type", choices=("ed25519", "x25519"), default="ed25519",
                     help="ed25519 signs releases (default); x25519 receives sealed secrets")
    gen.add_argument("--force", action="store_true",
                     help="overwrite an existing key file (the old key is lost for good)")
    add_json_option(gen, "print a JSON object")
    gen.set_defaults(func=run_generate)

    pub = sub.add_parser("public", help="print the public key of a private key file",
                         description="Print the public key of a private key file.",
                         epilog=_PUBLIC_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    pub.add_argument("keyfile", type=Path, metavar="KEYFILE")
    add_json_option(pub, "print a JSON object")
    pub.set_defaults(func=run_public)

    rot = sub.add_parser(
        "rotate", help="write the next root key set (.fleet/root/<N>.json)",
        description="Write .fleet/root/<N+1>.json naming the new trusted keys and threshold, signed by "
                    "every --key. It must be signed by the threshold of the current root's keys and of "
                    "the new keys. With no root file yet, writes 1.json (the genesis root).",
        epilog=_ROTATE_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    rot.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    rot.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                     help="a public key of the new key set (repeat)")
    rot.add_argument("--threshold", type=int, required=True, metavar="K",
                     help="how many of the new keys must sign a release")
    rot.add_argument("--key", action="append", required=True, type=Path, metavar="KEYFILE",
                     help="a private key that signs the new root (repeat)")
    add_json_option(rot, "print a JSON object")
    rot.set_defaults(func=run_rotate)


def run_generate(args: argparse.Namespace) -> int:
    """Create the key file and print its public key; return the exit code.

    Raises:
        KeyFileError: the file exists and ``--force`` was not given, or it cannot be written.
    """
    if not args.force and (args.out.exists() or args.out.is_symlink()):
        raise KeyFileError(f"{args.out} exists; refusing to overwrite a key (add --force to replace it: "
                           "the old key is lost, and anything signed or sealed to it needs the new one)")
    if args.type == "x25519":
        public = format_encryption_public(generate_encryption_key(args.out, overwrite=args.force).public_key)
    else:
        public = format_verify_key(generate_signing_key(args.out, overwrite=args.force).verify_key)
    emit({"public_key": public, "type": args.type, "path": str(args.out)}, public, as_json=args.json)
    _warn_if_shared(args.out.parent)
    return 0


def _warn_if_shared(directory: Path) -> None:
    """Say on stderr when a key's directory lets group or others in (an old ``~/.edge-fleet`` was
    created 0755): the key file itself is 0600, but its name and neighbours are visible."""
    try:
        mode = (directory if str(directory) else Path(".")).stat().st_mode
    except OSError:
        return
    if mode & 0o077 and directory.resolve() != Path.cwd().resolve():
        sys.stderr.write(f"fleetctl: warning: {directory} is open to group or others (mode "
                         f"{mode & 0o777:o}); keep keys in a private directory: chmod 700 {directory}\n")


def _key_type(path: Path) -> str:
    """Guess the kind of a private key file from its first bytes; loading it checks everything else.

    Raises:
        KeyFileError: the file holds a public key (``ed25519:`` or ``x25519:``), not a private one.
    """
    head = _head(path)
    for prefix in (ED25519_PREFIX, X25519_PREFIX):
        if head.startswith(prefix.encode()):
            raise KeyFileError(f"{path} holds a public key already ({prefix}...); 'keys public' reads the "
                               "private key file it came from")
    return "x25519" if head.startswith(_X25519_PRIVATE) else "ed25519"


def run_public(args: argparse.Namespace) -> int:
    """Print the public key of a private key file; return the exit code.

    Raises:
        KeyFileError: the file is missing, unsafe or not a key file.
    """
    kind = _key_type(args.keyfile)
    if kind == "x25519":
        public = format_encryption_public(load_encryption_key(args.keyfile).public_key)
    else:
        public = format_verify_key(load_signing_key(args.keyfile).verify_key)
    emit({"public_key": public, "type": kind, "path": str(args.keyfile)}, public, as_json=args.json)
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    """Write the next root metadata file; return the exit code."""
    signing_keys = load_signing_keys(args.key)
    summary = rotate_root(args.repo_dir, args.trust, threshold=args.threshold, signing_keys=signing_keys)
    text = (f"wrote {summary.path} (root version {summary.version}: {summary.threshold} of "
            f"{len(summary.keys)} keys, signed by {len(summary.signers)} key(s))")
    emit({"version": summary.version, "path": str(summary.path), "keys": sorted(summary.keys),
          "threshold": summary.threshold, "signers": sorted(summary.signers)}, text, as_json=args.json)
    return 0
