"""`fleetctl keys`: generate key files, show a key file's public key, rotate the trusted root keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.trust.keys import (
    format_encryption_public,
    format_verify_key,
    generate_encryption_key,
    generate_signing_key,
    load_encryption_key,
    load_signing_key,
)
from fleet_server.cli.common import emit
from fleet_server.signing import rotate_root

__all__ = ["register"]

_X25519_PRIVATE = b"x25519-private:"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys generate|public|rotate`` to the fleetctl parser."""
    keys = subparsers.add_parser("keys", help="generate and rotate signing keys",
                                 description="Generate key files, show public keys, rotate root keys.")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    gen = sub.add_parser("generate", help="create a private key file (0600) and print its public key",
                         description="Create a private key file (mode 0600) and print its public key.")
    gen.add_argument("--out", required=True, type=Path, metavar="KEYFILE", help="where to write the key")
    gen.add_argument("--type", choices=("ed25519", "x25519"), default="ed25519",
                     help="ed25519 signs releases (default); x25519 receives sealed secrets")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    gen.add_argument("--json", action="store_true", help="print a JSON object")
    gen.set_defaults(func=run_generate)

    pub = sub.add_parser("public", help="print the public key of a private key file",
                         description="Print the public key of a private key file.")
    pub.add_argument("keyfile", type=Path, metavar="KEYFILE")
    pub.add_argument("--json", action="store_true", help="print a JSON object")
    pub.set_defaults(func=run_public)

    rot = sub.add_parser(
        "rotate", help="write the next root key set (.fleet/root/<N>.json)",
        description="Write .fleet/root/<N+1>.json naming the new trusted keys and threshold, signed by "
                    "every --key. It must be signed by the threshold of the current root's keys and of "
                    "the new keys. With no root file yet, writes 1.json (the genesis root).")
    rot.add_argument("repo_dir", type=Path, metavar="REPO_DIR")
    rot.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                     help="a public key of the new key set (repeat)")
    rot.add_argument("--threshold", type=int, required=True, metavar="K",
                     help="how many of the new keys must sign a release")
    rot.add_argument("--key", action="append", required=True, type=Path, metavar="KEYFILE",
                     help="a private key that signs the new root (repeat)")
    rot.add_argument("--json", action="store_true", help="print a JSON object")
    rot.set_defaults(func=run_rotate)


def run_generate(args: argparse.Namespace) -> int:
    """Create the key file and print its public key; return the exit code."""
    if args.type == "x25519":
        public = format_encryption_public(generate_encryption_key(args.out, overwrite=args.force).public_key)
    else:
        public = format_verify_key(generate_signing_key(args.out, overwrite=args.force).verify_key)
    emit({"public_key": public, "type": args.type, "path": str(args.out)}, public, as_json=args.json)
    return 0


def _key_type(path: Path) -> str:
    """Guess the kind of a key file from its first bytes; loading it checks everything else."""
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_X25519_PRIVATE))
    except OSError:
        return "ed25519"
    return "x25519" if head == _X25519_PRIVATE else "ed25519"


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
    signing_keys = [load_signing_key(path) for path in args.key]
    summary = rotate_root(args.repo_dir, args.trust, threshold=args.threshold, signing_keys=signing_keys)
    text = (f"wrote {summary.path} (root version {summary.version}: {summary.threshold} of "
            f"{len(summary.keys)} keys, signed by {len(summary.signers)} key(s))")
    emit({"version": summary.version, "path": str(summary.path), "keys": sorted(summary.keys),
          "threshold": summary.threshold, "signers": sorted(summary.signers)}, text, as_json=args.json)
    return 0
