"""Key material: Ed25519 signing/identity keys and X25519 encryption keys, their text forms and files.

Public keys travel as ``ed25519:<base64>`` and ``x25519:<base64>`` (standard base64 of the 32 raw
bytes). Private key files hold one line ``ed25519-private:<base64 seed>`` or
``x25519-private:<base64>`` and are written with mode 0600, atomically, never over an existing file
unless asked.

The PyNaCl key types (``SigningKey``, ``VerifyKey``, ``PrivateKey``, ``PublicKey``) are re-exported
here so that code outside the trust package names them without importing PyNaCl itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from edge_core.errors import KeyFileError

__all__ = [
    "ED25519_PREFIX",
    "X25519_PREFIX",
    "PrivateKey",
    "PublicKey",
    "SigningKey",
    "VerifyKey",
    "format_encryption_public",
    "format_verify_key",
    "generate_encryption_key",
    "generate_signing_key",
    "load_encryption_key",
    "load_signing_key",
    "parse_encryption_public",
    "parse_verify_key",
]

ED25519_PREFIX = "ed25519:"
X25519_PREFIX = "x25519:"
_ED_PRIV = "ed25519-private:"
_X_PRIV = "x25519-private:"
_MAX_KEY_FILE = 4096


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{what} is not valid base64") from exc
    if len(raw) != 32:
        raise KeyFileError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def format_verify_key(key: VerifyKey) -> str:
    """Return the text form ``ed25519:<base64>`` of an Ed25519 public key."""
    return ED25519_PREFIX + _b64(bytes(key))


def parse_verify_key(text: str) -> VerifyKey:
    """Parse ``ed25519:<base64>`` into a VerifyKey.

    Raises:
        KeyFileError: wrong prefix, bad base64 or wrong length.
    """
    if not isinstance(text, str) or not text.startswith(ED25519_PREFIX):
        raise KeyFileError(f"public key must look like {ED25519_PREFIX}<base64>: {str(text)[:60]!r}")
    return VerifyKey(_unb64(text[len(ED25519_PREFIX):], "ed25519 public key"))


def format_encryption_public(key: PublicKey) -> str:
    """Return the text form ``x25519:<base64>`` of an X25519 public key."""
    return X25519_PREFIX + _b64(bytes(key))


def parse_encryption_public(text: str) -> PublicKey:
    """Parse ``x25519:<base64>`` into a PublicKey.

    Raises:
        KeyFileError: wrong prefix, bad base64 or wrong length.
    """
    if not isinstance(text, str) or not text.startswith(X25519_PREFIX):
        raise KeyFileError(f"encryption key must look like {X25519_PREFIX}<base64>: {str(text)[:60]!r}")
    return PublicKey(_unb64(text[len(X25519_PREFIX):], "x25519 public key"))


def _write_private(path: Path, line: str, *, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} exists; refusing to overwrite a key")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new key directory is private
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (line + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_private(path: Path, prefix: str) -> bytes:
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        data = os.read(fd, _MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a key file")
    text = data.decode("ascii", errors="replace").strip()
    if not text.startswith(prefix):
        raise KeyFileError(f"{path} is not a {prefix.rstrip(':')} key file")
    return _unb64(text[len(prefix):], f"key in {path}")


def generate_signing_key(path: Path, *, overwrite: bool = False) -> SigningKey:
    """Create a new Ed25519 key, write it to ``path`` (0600) and return it.

    Raises:
        KeyFileError: the file exists and ``overwrite`` is false.
    """
    key = SigningKey.generate()
    _write_private(path, _ED_PRIV + _b64(bytes(key)), overwrite=overwrite)
    return key


def load_signing_key(path: Path) -> SigningKey:
    """Read an Ed25519 private key file written by :func:`generate_signing_key`.

    Raises:
        KeyFileError: missing, unreadable, group/world-readable or malformed.
    """
    return SigningKey(_read_private(path, _ED_PRIV))


def generate_encryption_key(path: Path, *, overwrite: bool = False) -> PrivateKey:
    """Create a new X25519 key, write it to ``path`` (0600) and return it.

    Raises:
        KeyFileError: the file exists and ``overwrite`` is false.
    """
    key = PrivateKey.generate()
    _write_private(path, _X_PRIV + _b64(bytes(key)), overwrite=overwrite)
    return key


def load_encryption_key(path: Path) -> PrivateKey:
    """Read an X25519 private key file written by :func:`generate_encryption_key`.

    Raises:
        KeyFileError: missing, unreadable, group/world-readable or malformed.
    """
    return PrivateKey(_read_private(path, _X_PRIV))
