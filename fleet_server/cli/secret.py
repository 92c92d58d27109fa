"""`fleetctl secret`: seal a value to device encryption keys, inspect sealed files, change recipients."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_core.errors import KeyFileError
from edge_core.trust import sealed
from edge_core.trust.keys import (
    ED25519_PREFIX,
    PublicKey,
    format_encryption_public,
    generate_encryption_key,
    load_encryption_key,
    parse_encryption_public,
)
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, emit
from fleet_server.errors import UsageError

__all__ = ["register"]

_DESCRIPTION = """\
Sealed secrets are encrypted in the config repository to device X25519 encryption keys
(the x25519:... key `edge-agent init` prints), never to their ed25519 identity keys.
Seal to an operator escrow key as well, so that devices can be added or removed later."""


def _parse_recipient(text: str) -> PublicKey:
    """Parse a ``--to``/``--remove`` value (``x25519:<base64>``) into a public key.

    Raises:
        UsageError: an ``ed25519:`` identity key, or not a valid ``x25519:`` key.
    """
    if text.startswith(ED25519_PREFIX):
        raise UsageError(f"{text[:24]}... is an ed25519 identity key; secrets are sealed to the device's "
                         "separate x25519: encryption key, which `edge-agent init` prints")
    try:
        return parse_encryption_public(text)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from exc


def _read_stdin_value() -> bytes:
    data = sys.stdin.buffer.read(sealed.MAX_PLAINTEXT_BYTES + 1)
    if not data:
        raise UsageError("nothing to seal: the value is read from stdin and it was empty")
    if len(data) > sealed.MAX_PLAINTEXT_BYTES:
        raise UsageError(f"the value on stdin is larger than {sealed.MAX_PLAINTEXT_BYTES} bytes")
    return data


def _read_sealed_file(path: Path) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(sealed.MAX_DOCUMENT_BYTES + 1)
    if len(data) > sealed.MAX_DOCUMENT_BYTES:
        raise UsageError(f"{path} is larger than {sealed.MAX_DOCUMENT_BYTES} bytes")
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync the directory).

    An existing file keeps its mode; a new one gets 0644 (a sealed file holds no plaintext).

    Raises:
        OSError: the directory cannot be written.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.name}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _cmd_seal(args: argparse.Namespace) -> int:
    recipients = [_parse_recipient(text) for text in args.to]
    sealed.validate_secret_id(args.id)
    value = _read_stdin_value()
    document = sealed.seal(value, secret_id=args.id, version=args.version, recipients=recipients)
    if args.out is None:
        sys.stdout.write(document.decode("ascii"))  # the sealed document is JSON already
    elif args.json:
        _write_atomically(Path(args.out), document)
        info = sealed.inspect(document)
        emit({"id": info.id, "version": info.version, "recipients": list(info.recipients),
              "path": str(args.out)}, "", as_json=True)
    else:
        _write_atomically(Path(args.out), document)
        sys.stderr.write(f"sealed secret {args.id} version {args.version} to {len(set(args.to))} "
                         f"recipient(s) in {args.out}\n")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = sealed.inspect(_read_sealed_file(Path(args.file)))
    text = "\n".join([f"id: {info.id}", f"version: {info.version}", "recipients:",
                      *(f"  {key}" for key in info.recipients)])
    emit({"id": info.id, "version": info.version, "recipients": list(info.recipients)}, text,
         as_json=args.json)
    return 0


def _cmd_add_recipient(args: argparse.Namespace) -> int:
    path = Path(args.file)
    new = _parse_recipient(args.to)
    opener = load_encryption_key(Path(args.key))
    updated = sealed.add_recipient(_read_sealed_file(path), opener=opener, new=new)
    _write_atomically(path, updated)
    info = sealed.inspect(updated)
    emit({"path": str(path), "id": info.id, "version": info.version, "recipients": list(info.recipients)},
         f"{path}: secret {info.id} now has {len(info.recipients)} recipient(s)", as_json=args.json)
    return 0


def _cmd_remove_recipient(args: argparse.Namespace) -> int:
    path = Path(args.file)
    gone = _parse_recipient(args.remove)
    opener = load_encryption_key(Path(args.key))
    updated = sealed.remove_recipient(_read_sealed_file(path), opener=opener, remove=gone)
    _write_atomically(path, updated)
    info = sealed.inspect(updated)
    emit({"path": str(path), "id": info.id, "version": info.version, "recipients": list(info.recipients)},
         f"{path}: secret {info.id} re-sealed for {len(info.recipients)} recipient(s); "
         "rotate the value if the removed device may have read it", as_json=args.json)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    key = generate_encryption_key(Path(args.out))
    public = format_encryption_public(key.public_key)
    emit({"public_key": public, "type": "x25519", "path": str(args.out)}, public, as_json=args.json)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
    return value


_INSPECT_EXAMPLES = """examples:
  fleetctl secret inspect config/secrets/wifi-psk.sealed.json
  fleetctl secret inspect config/secrets/wifi-psk.sealed.json --json
"""
_KEYGEN_EXAMPLES = """examples:
  fleetctl secret keygen --out ~/.config/edge-fleet/keys/escrow.key   # prints x25519:<base64>
  fleetctl secret keygen --out escrow.key --json
"""
_SEAL_EXAMPLES = """examples:
  printf %s "$WIFI_PSK" | fleetctl secret seal --id wifi-psk --to x25519:DEVICE --to x25519:ESCROW \\
      --out config/secrets/wifi-psk.sealed.json
  fleetctl secret seal --id api-token --version 2 --to x25519:DEVICE < token.txt > api-token.sealed.json
"""
_ADD_EXAMPLES = """examples:
  fleetctl secret add-recipient config/secrets/wifi-psk.sealed.json \\
      --key ~/.config/edge-fleet/keys/escrow.key --to x25519:NEWDEVICE
"""
_REMOVE_EXAMPLES = """examples:
  fleetctl secret remove-recipient config/secrets/wifi-psk.sealed.json \\
      --key ~/.config/edge-fleet/keys/escrow.key --remove x25519:OLDDEVICE --json
"""
_GROUP_EXAMPLES = "examples:\n" + "".join(
    e.removeprefix("examples:\n") for e in (_SEAL_EXAMPLES, "examples:\n  fleetctl secret inspect "
                                             "config/secrets/wifi-psk.sealed.json\n", _KEYGEN_EXAMPLES))

def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fleetctl secret`` and its actions (seal, inspect, add-recipient, remove-recipient, keygen)."""
    parser = subparsers.add_parser("secret", help="seal secrets to device encryption keys",
                                   description=_DESCRIPTION, epilog=_GROUP_EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="secret_command", metavar="ACTION", required=True)

    p = actions.add_parser("seal", help="seal the value read from stdin",
                           description="Read a value from stdin (byte for byte, nothing stripped) and "
                                       "write it sealed to every --to key.",
                           epilog=_SEAL_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    p.add_argument("--to", action="append", required=True, metavar="PUBKEY",
                   help="recipient x25519:<base64> encryption key (repeat for several)")
    p.add_argument("--id", required=True, help="secret id, 1-128 characters of [A-Za-z0-9._-]")
    p.add_argument("--version", type=_positive_int, default=1, help="secret version (default 1)")
    p.add_argument("--out", metavar="FILE", help="write the sealed file here instead of stdout")
    add_json_option(p, "with --out: print what was sealed as JSON (without --out the sealed JSON "
                       "document is printed)")
    p.set_defaults(func=_cmd_seal)

    p = actions.add_parser("inspect", help="show id, version and recipients (never the value)",
                           description="Show a sealed file's id, version and recipient keys; the value "
                                       "stays sealed (no key is needed or read).",
                           epilog=_INSPECT_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    p.add_argument("file", metavar="FILE")
    add_json_option(p, "print JSON")
    p.set_defaults(func=_cmd_inspect)

    p = actions.add_parser("add-recipient", help="wrap the same data key for one more device",
                           description="Rewrite FILE so that one more key can open it; --key must "
                                       "already be a recipient (an escrow key).",
                           epilog=_ADD_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", required=True, metavar="OPENER_KEYFILE",
                   help="x25519 private key file of an existing recipient")
    p.add_argument("--to", required=True, metavar="PUBKEY", help="new recipient x25519:<base64> key")
    add_json_option(p, "print the secret's id, version and recipients as JSON")
    p.set_defaults(func=_cmd_add_recipient)

    p = actions.add_parser("remove-recipient", help="re-seal for every recipient but one",
                           description="Rewrite FILE with a new data key for every recipient but "
                                       "--remove; --key must be a recipient.",
                           epilog=_REMOVE_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", required=True, metavar="OPENER_KEYFILE",
                   help="x25519 private key file of an existing recipient")
    p.add_argument("--remove", required=True, metavar="PUBKEY", help="x25519:<base64> key to remove")
    add_json_option(p, "print the secret's id, version and recipients as JSON")
    p.set_defaults(func=_cmd_remove_recipient)

    p = actions.add_parser("keygen", help="create an x25519 key file (e.g. an operator escrow key)",
                           description="Create an x25519 private key file (mode 0600) that sealed "
                                       "secrets can be addressed to, and print its public key.",
                           epilog=_KEYGEN_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    p.add_argument("--out", required=True, metavar="KEYFILE", help="private key file to create (0600)")
    add_json_option(p, "print the public key as a JSON object")
    p.set_defaults(func=_cmd_keygen)
