"""Verify Git commits signed with SSH keys (``gpg.format=ssh``) against an allowed-signers list.

Pure: PyNaCl only, no ``ssh-keygen`` at run time. Only ``ssh-ed25519`` keys are supported.

The signature of a commit sits in its ``gpgsig`` header as an armored SSHSIG blob::

    "SSHSIG" uint32 version(1) string publickey string namespace string reserved
    string hash_algorithm string signature

and the Ed25519 signature covers ``"SSHSIG" string namespace string reserved string hash_algorithm
string H(payload)``, where the payload is the commit object without its ``gpgsig`` header.

The allowed-signers text follows OpenSSH's format, one key a line:
``principals [options] ssh-ed25519 AAAA... [comment]``. The ``namespaces="..."`` option is honoured
(a key whose list does not match ``git`` is not allowed to sign commits). Options this verifier cannot
enforce (``cert-authority``, ``valid-after``, ``valid-before``) and unknown options are refused, as are
key types other than ``ssh-ed25519``: the whole list is rejected rather than read differently from
OpenSSH.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from edge_core.errors import ConfigError, SignatureError, UntrustedKeyError

__all__ = [
    "GIT_NAMESPACE",
    "AllowedSigner",
    "AllowedSigners",
    "parse_allowed_signers",
    "split_commit_signature",
    "verify_commit",
]

GIT_NAMESPACE = "git"
_KEY_TYPE = "ssh-ed25519"
_MAGIC = b"SSHSIG"
_SIG_VERSION = 1
_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_END = "-----END SSH SIGNATURE-----"
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
_MAX_ARMOR = 64 * 1024
_MAX_SIGNERS_TEXT = 4 * 1024 * 1024
_REFUSED_OPTIONS = {
    "cert-authority": "certificate authorities are not supported",
    "valid-after": "validity windows are not supported",
    "valid-before": "validity windows are not supported",
}


@dataclass(frozen=True)
class AllowedSigner:
    """One line of an allowed-signers list: who, which Ed25519 key, and for which namespaces."""

    principals: tuple[str, ...]
    key: bytes
    namespaces: tuple[str, ...] | None = None

    def allows_namespace(self, namespace: str) -> bool:
        """Return whether this key may sign in ``namespace`` (OpenSSH pattern-list semantics)."""
        if self.namespaces is None:
            return True
        return _match_pattern_list(namespace, self.namespaces)


@dataclass(frozen=True)
class AllowedSigners:
    """A parsed allowed-signers list."""

    entries: tuple[AllowedSigner, ...]

    def principal_for(self, key: bytes, namespace: str) -> str | None:
        """Return the first principal of the first line allowing ``key`` in ``namespace``, else None."""
        for entry in self.entries:
            if entry.key == key and entry.allows_namespace(namespace):
                return entry.principals[0]
        return None

    def knows_key(self, key: bytes) -> bool:
        """Return whether ``key`` appears on any line, whatever its namespaces."""
        return any(entry.key == key for entry in self.entries)


def _pattern_matches(text: str, pattern: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, flags=re.DOTALL) is not None


def _match_pattern_list(text: str, patterns: tuple[str, ...]) -> bool:
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _pattern_matches(text, pattern[1:] if negated else pattern):
            if negated:
                return False
            matched = True
    return matched


# ---------------------------------------------------------------- allowed signers


def _tokens(line: str, lineno: int) -> list[str]:
    """Split on blanks outside double quotes (quotes are kept, as OpenSSH keeps them in options)."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for c in line:
        if c == '"':
            quoted = not quoted
            current.append(c)
        elif c in " \t" and not quoted:
            if current:
                out.append("".join(current))
                current = []
        else:
            current.append(c)
    if quoted:
        raise ConfigError(f"allowed signers line {lineno}: unterminated quote")
    if current:
        out.append("".join(current))
    return out


def _split_options(text: str, lineno: int) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
            current.append(c)
        elif c == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    if any(not p for p in parts):
        raise ConfigError(f"allowed signers line {lineno}: empty option")
    return parts


def _parse_namespaces(options: str, lineno: int) -> tuple[str, ...] | None:
    namespaces: tuple[str, ...] | None = None
    for option in _split_options(options, lineno):
        name, sep, value = option.partition("=")
        name = name.lower()
        if name in _REFUSED_OPTIONS:
            raise ConfigError(f"allowed signers line {lineno}: option {name}: {_REFUSED_OPTIONS[name]}")
        if name != "namespaces":
            raise ConfigError(f"allowed signers line {lineno}: unknown option {name[:40]!r}")
        if namespaces is not None:
            raise ConfigError(f"allowed signers line {lineno}: namespaces given twice")
        if not sep or len(value) < 2 or not (value.startswith('"') and value.endswith('"')):
            raise ConfigError(f'allowed signers line {lineno}: namespaces must be namespaces="a,b"')
        names = tuple(n for n in value[1:-1].split(",") if n)
        if not names or '"' in value[1:-1]:
            raise ConfigError(f"allowed signers line {lineno}: namespaces lists no namespace")
        namespaces = names
    return namespaces


def _parse_key_blob(keytype: str, b64: str, lineno: int) -> bytes:
    if keytype != _KEY_TYPE:
        raise ConfigError(f"allowed signers line {lineno}: key type {keytype[:40]!r} is not supported "
                          f"(only {_KEY_TYPE})")
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"allowed signers line {lineno}: key is not valid base64") from exc
    try:
        return _ed25519_key_from_blob(blob)
    except SignatureError as exc:
        raise ConfigError(f"allowed signers line {lineno}: {exc}") from exc


def _parse_signer_line(line: str, lineno: int) -> AllowedSigner:
    tokens = _tokens(line, lineno)
    if len(tokens) < 3:
        raise ConfigError(f"allowed signers line {lineno}: expected principals, key type and key")
    principals_text = tokens[0]
    if principals_text.startswith('"') and principals_text.endswith('"') and len(principals_text) >= 2:
        principals_text = principals_text[1:-1]
    principals = tuple(p for p in principals_text.split(",") if p)
    if not principals or '"' in principals_text:
        raise ConfigError(f"allowed signers line {lineno}: no principal")
    rest = tokens[1:]
    namespaces: tuple[str, ...] | None = None
    if not _looks_like_key_type(rest[0]):
        namespaces = _parse_namespaces(rest[0], lineno)
        rest = rest[1:]
        if len(rest) < 2:
            raise ConfigError(f"allowed signers line {lineno}: expected a key type and a key after options")
    key = _parse_key_blob(rest[0], rest[1], lineno)
    return AllowedSigner(principals, key, namespaces)


def _looks_like_key_type(token: str) -> bool:
    return token.startswith(("ssh-", "ecdsa-", "sk-", "rsa-")) and "=" not in token and '"' not in token


def parse_allowed_signers(text: str) -> AllowedSigners:
    """Parse an OpenSSH allowed-signers list (``principals [options] ssh-ed25519 AAAA... [comment]``).

    Blank lines and lines starting with ``#`` are ignored. Only the ``namespaces="..."`` option is
    accepted; any other option, and any key type but ``ssh-ed25519``, makes the whole list invalid.

    Raises:
        ConfigError: the text is too large, or a line is malformed, uses an unsupported option or
            key type (the message names the line).
    """
    if not isinstance(text, str):
        raise ConfigError("allowed signers must be text")
    if len(text) > _MAX_SIGNERS_TEXT:
        raise ConfigError("allowed signers list is too large")
    entries: list[AllowedSigner] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entries.append(_parse_signer_line(line, lineno))
    return AllowedSigners(tuple(entries))


# ---------------------------------------------------------------- commit objects


def split_commit_signature(raw_commit: bytes) -> tuple[bytes, bytes | None]:
    """Split a raw commit object into the signed payload and its ``gpgsig`` signature.

    The payload is the commit without the ``gpgsig`` header and its continuation lines (exactly what
    Git hands to the signer); the signature is that header's value with the continuation marks
    removed, or None when the commit carries none.

    Raises:
        SignatureError: the commit is not bytes or has more than one ``gpgsig`` header.
    """
    if not isinstance(raw_commit, bytes | bytearray):
        raise SignatureError("commit object must be bytes")
    raw = bytes(raw_commit)
    end = raw.find(b"\n\n")
    header, body = (raw, b"") if end < 0 else (raw[:end + 1], raw[end + 1:])
    payload: list[bytes] = []
    signature: list[bytes] | None = None
    in_signature = False
    for line in header.splitlines(keepends=True):
        if in_signature and line.startswith(b" "):
            assert signature is not None
            signature.append(line[1:])
            continue
        in_signature = False
        if line.startswith(b"gpgsig "):
            if signature is not None:
                raise SignatureError("commit has more than one gpgsig header")
            signature = [line[len(b"gpgsig "):]]
            in_signature = True
            continue
        payload.append(line)
    sig = None
    if signature is not None:
        sig = b"".join(signature)
        if not sig.endswith(b"\n"):
            sig += b"\n"
    return b"".join(payload) + body, sig


# ---------------------------------------------------------------- SSHSIG


class _Reader:
    """Bounds-checked reader of SSH wire-format data; every short read is a SignatureError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise SignatureError(f"{self._what} is truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.uint32())

    def text(self) -> str:
        try:
            return self.string().decode("ascii")
        except UnicodeDecodeError as exc:
            raise SignatureError(f"{self._what} holds a non-ASCII name") from exc

    def done(self) -> None:
        if self._pos != len(self._data):
            raise SignatureError(f"{self._what} has trailing bytes")


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _ed25519_key_from_blob(blob: bytes) -> bytes:
    reader = _Reader(blob, "public key")
    keytype = reader.text()
    if keytype != _KEY_TYPE:
        raise SignatureError(f"key type {keytype[:40]!r} is not supported (only {_KEY_TYPE})")
    key = reader.string()
    reader.done()
    if len(key) != 32:
        raise SignatureError("ssh-ed25519 key must be 32 bytes")
    return key


def _dearmor(armored: bytes) -> bytes:
    if len(armored) > _MAX_ARMOR:
        raise SignatureError("commit signature is too large")
    try:
        text = armored.decode("ascii")
    except UnicodeDecodeError as exc:
        raise SignatureError("commit signature is not ASCII armor") from exc
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or lines[0] != _BEGIN:
        raise SignatureError("commit signature is not an SSH signature")
    if len(lines) < 3 or lines[-1] != _END:
        raise SignatureError("SSH signature armor is not terminated")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("SSH signature armor is not valid base64") from exc


@dataclass(frozen=True)
class _SshSig:
    key: bytes
    namespace: str
    reserved: bytes
    hash_algorithm: str
    signature: bytes


def _parse_sshsig(blob: bytes) -> _SshSig:
    reader = _Reader(blob, "SSH signature")
    if reader.take(len(_MAGIC)) != _MAGIC:
        raise SignatureError("SSH signature has the wrong magic")
    version = reader.uint32()
    if version != _SIG_VERSION:
        raise SignatureError(f"SSH signature version {version} is not supported")
    key = _ed25519_key_from_blob(reader.string())
    namespace = reader.text()
    reserved = reader.string()
    hash_algorithm = reader.text()
    sig_blob = reader.string()
    reader.done()
    if namespace != GIT_NAMESPACE:
        raise SignatureError(f"SSH signature namespace is {namespace[:40]!r}, not {GIT_NAMESPACE!r}")
    if hash_algorithm not in _HASHES:
        raise SignatureError(f"SSH signature hash {hash_algorithm[:40]!r} is not sha256 or sha512")
    sig_reader = _Reader(sig_blob, "SSH signature value")
    sig_type = sig_reader.text()
    if sig_type != _KEY_TYPE:
        raise SignatureError(f"SSH signature type {sig_type[:40]!r} is not supported (only {_KEY_TYPE})")
    raw = sig_reader.string()
    sig_reader.done()
    if len(raw) != 64:
        raise SignatureError("ssh-ed25519 signature must be 64 bytes")
    return _SshSig(key, namespace, reserved, hash_algorithm, raw)


def verify_commit(raw_commit: bytes, signers: AllowedSigners) -> str:
    """Verify the SSH signature of a raw commit object and return the signer's principal.

    Raises:
        SignatureError: unsigned commit, bad armor, wrong magic or version, namespace other than
            ``git``, a key or signature type other than ``ssh-ed25519``, a hash other than sha256 or
            sha512, a truncated blob, or a signature that does not match the commit.
        UntrustedKeyError: the signature is valid but its key is not allowed to sign Git commits.
    """
    payload, armored = split_commit_signature(raw_commit)
    if armored is None:
        raise SignatureError("commit is not signed")
    sig = _parse_sshsig(_dearmor(armored))
    digest = _HASHES[sig.hash_algorithm](payload).digest()
    signed = (_MAGIC + _ssh_string(sig.namespace.encode("ascii")) + _ssh_string(sig.reserved)
              + _ssh_string(sig.hash_algorithm.encode("ascii")) + _ssh_string(digest))
    try:
        VerifyKey(sig.key).verify(signed, sig.signature)
    except (CryptoError, ValueError) as exc:
        raise SignatureError("SSH signature does not match the commit") from exc
    principal = signers.principal_for(sig.key, GIT_NAMESPACE)
    if principal is None:
        fingerprint = "SHA256:" + base64.b64encode(
            hashlib.sha256(_ssh_string(_KEY_TYPE.encode()) + _ssh_string(sig.key)).digest()
        ).decode("ascii").rstrip("=")
        if signers.knows_key(sig.key):
            raise UntrustedKeyError(f"key {fingerprint} is not allowed to sign in namespace git")
        raise UntrustedKeyError(f"key {fingerprint} is not in the allowed signers")
    return principal
