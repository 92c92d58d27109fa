"""The device identity: an Ed25519 key (who the device is) and an X25519 key (what secrets seal to).

Both live in the agent's state directory as 0600 key files (``identity.key``, ``encryption.key``)
written by :mod:`edge_core.trust.keys`. :func:`init_identity` creates whichever is missing and never
replaces an existing key; the public halves are what an operator registers for the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge_core.errors import KeyFileError
from edge_core.trust.keys import (
    PrivateKey,
    SigningKey,
    format_encryption_public,
    format_verify_key,
    generate_encryption_key,
    generate_signing_key,
    load_encryption_key,
    load_signing_key,
)

__all__ = [
    "ENCRYPTION_KEY_FILE",
    "IDENTITY_KEY_FILE",
    "Identity",
    "init_identity",
    "load_encryption_private",
    "load_identity",
]

IDENTITY_KEY_FILE = "identity.key"
ENCRYPTION_KEY_FILE = "encryption.key"


@dataclass(frozen=True)
class Identity:
    """The public halves of the device keys, in their text forms."""

    signing_public: str
    encryption_public: str
    created: bool = False


def _ensure_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise KeyFileError(f"cannot create state directory {state_dir}: {exc.strerror or exc}") from exc


def init_identity(state_dir: Path) -> Identity:
    """Create the device keys in ``state_dir`` when missing and return the public halves.

    Existing keys are loaded, never replaced; ``created`` tells whether any key was new.

    Raises:
        KeyFileError: the directory or a key file cannot be created or an existing key is unusable.
    """
    state_dir = Path(state_dir)
    _ensure_dir(state_dir)
    created = False
    sign_path = state_dir / IDENTITY_KEY_FILE
    enc_path = state_dir / ENCRYPTION_KEY_FILE
    signing: SigningKey
    if os.path.lexists(sign_path):
        signing = load_signing_key(sign_path)
    else:
        signing = generate_signing_key(sign_path)
        created = True
    encryption: PrivateKey
    if os.path.lexists(enc_path):
        encryption = load_encryption_key(enc_path)
    else:
        encryption = generate_encryption_key(enc_path)
        created = True
    return Identity(signing_public=format_verify_key(signing.verify_key),
                    encryption_public=format_encryption_public(encryption.public_key), created=created)


def load_identity(state_dir: Path) -> Identity:
    """Load the device keys from ``state_dir`` and return their public halves.

    Raises:
        KeyFileError: a key is missing (run ``edge-agent init``), unreadable or malformed.
    """
    state_dir = Path(state_dir)
    signing = load_signing_key(state_dir / IDENTITY_KEY_FILE)
    encryption = load_encryption_key(state_dir / ENCRYPTION_KEY_FILE)
    return Identity(signing_public=format_verify_key(signing.verify_key),
                    encryption_public=format_encryption_public(encryption.public_key))


def load_encryption_private(state_dir: Path) -> PrivateKey:
    """Return the device's X25519 private key, which opens sealed secrets addressed to it.

    Raises:
        KeyFileError: missing (run ``edge-agent init``), unreadable, too open or malformed.
    """
    return load_encryption_key(Path(state_dir) / ENCRYPTION_KEY_FILE)
