"""SSH-signed Git commits: real ssh-keygen keys, real `git commit -S`, cross-checked with ssh-keygen."""

from __future__ import annotations

import base64
import hashlib
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from edge_core.errors import ConfigError, SignatureError, UntrustedKeyError
from edge_core.trust.sshsig import (
    AllowedSigners,
    parse_allowed_signers,
    split_commit_signature,
    verify_commit,
)

PRINCIPAL = "operator@example.invalid"


@dataclass(frozen=True)
class SshKey:
    private: Path
    public: Path
    line: str  # "ssh-ed25519 AAAA..." without the comment


def _ssh_keygen(directory: Path, name: str) -> SshKey:
    private = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private)],
                   check=True, capture_output=True, timeout=30)
    public = private.with_name(name + ".pub")
    keytype, blob = public.read_text().split()[:2]
    return SshKey(private, public, f"{keytype} {blob}")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SshKey]:
    directory = tmp_path_factory.mktemp("sshkeys")
    return {name: _ssh_keygen(directory, name) for name in ("operator", "stranger")}


def _git(repo: Path, *args: str) -> bytes:
    result = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=30)
    return result.stdout


def _signed_commit(tmp_path: Path, key: SshKey | None, message: str = "Set the NTP servers") -> bytes:
    repo = tmp_path / "repo"
    if not repo.exists():
        subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=30)
    (repo / "fleet.yaml").write_text(f"message: {message}\n")
    _git(repo, "add", "fleet.yaml")
    sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key.public}"] if key else []
    _git(repo, *sign, "commit", "-q", *(["-S"] if key else []), "-m", message)
    return _git(repo, "cat-file", "commit", "HEAD")


def _signers(*lines: str) -> AllowedSigners:
    return parse_allowed_signers("\n".join(lines) + "\n")


# ------------------------------------------------------------------ real git + ssh-keygen


def test_verify_real_signed_commit(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, keys["operator"])
    assert b"gpgsig -----BEGIN SSH SIGNATURE-----" in raw
    signers = _signers("# fleet operators", "",
                       f"{PRINCIPAL},backup@example.invalid {keys['operator'].line} op")
    assert verify_commit(raw, signers) == PRINCIPAL


def test_tampered_message_is_refused(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, keys["operator"], "Set the NTP servers")
    tampered = raw.replace(b"Set the NTP servers", b"Set the NTP serverz")
    assert tampered != raw
    with pytest.raises(SignatureError) as info:
        verify_commit(tampered, _signers(f"{PRINCIPAL} {keys['operator'].line}"))
    assert type(info.value) is SignatureError


def test_tampered_tree_is_refused(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, keys["operator"])
    tree = raw.split(b"\n", 1)[0]
    tampered = raw.replace(tree, b"tree " + b"0" * 40, 1)
    with pytest.raises(SignatureError):
        verify_commit(tampered, _signers(f"{PRINCIPAL} {keys['operator'].line}"))


def test_key_not_in_allowed_signers(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, keys["stranger"])
    with pytest.raises(UntrustedKeyError, match="not in the allowed signers"):
        verify_commit(raw, _signers(f"{PRINCIPAL} {keys['operator'].line}"))


def test_unsigned_commit_is_refused(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, None)
    assert split_commit_signature(raw) == (raw, None)
    with pytest.raises(SignatureError, match="not signed"):
        verify_commit(raw, _signers(f"{PRINCIPAL} {keys['operator'].line}"))


@pytest.mark.parametrize(("options", "allowed"), [
    ('namespaces="file"', False),
    ('namespaces="file,email"', False),
    ('namespaces="*,!git"', False),
    ('NAMESPACES="gi?"', True),
    ('namespaces="file,git"', True),
    ('namespaces="*"', True),
])
def test_namespace_restriction(tmp_path: Path, keys: dict[str, SshKey], options: str, allowed: bool) -> None:
    raw = _signed_commit(tmp_path, keys["operator"])
    signers = _signers(f"{PRINCIPAL} {options} {keys['operator'].line}")
    if allowed:
        assert verify_commit(raw, signers) == PRINCIPAL
    else:
        with pytest.raises(UntrustedKeyError, match="namespace git"):
            verify_commit(raw, signers)


def test_later_line_allowing_git_is_used(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, keys["operator"])
    signers = _signers(f'files@example.invalid namespaces="file" {keys["operator"].line}',
                       f'{PRINCIPAL} namespaces="git" {keys["operator"].line}')
    assert verify_commit(raw, signers) == PRINCIPAL


def _ssh_keygen_verify(tmp_path: Path, key_line: str, payload: bytes, signature: bytes) -> bool:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"{PRINCIPAL} {key_line}\n")
    sig_file = tmp_path / "commit.sig"
    sig_file.write_bytes(signature)
    result = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", PRINCIPAL, "-n", "git",
                             "-s", str(sig_file)], input=payload, capture_output=True, timeout=30,
                            check=False)
    return result.returncode == 0


def test_cross_check_with_ssh_keygen(tmp_path: Path, keys: dict[str, SshKey]) -> None:
    raw = _signed_commit(tmp_path, keys["operator"])
    payload, signature = split_commit_signature(raw)
    assert signature is not None
    assert signature.startswith(b"-----BEGIN SSH SIGNATURE-----\n")
    assert signature.endswith(b"-----END SSH SIGNATURE-----\n")
    assert b"gpgsig" not in payload
    assert payload.endswith(b"\n\nSet the NTP servers\n")
    signers = _signers(f"{PRINCIPAL} {keys['operator'].line}")
    # both verifiers accept the real payload ...
    assert _ssh_keygen_verify(tmp_path, keys["operator"].line, payload, signature)
    assert verify_commit(raw, signers) == PRINCIPAL
    # ... and both refuse the same one-byte change
    changed = payload.replace(b"NTP", b"NTQ")
    assert not _ssh_keygen_verify(tmp_path, keys["operator"].line, changed, signature)
    with pytest.raises(SignatureError):
        verify_commit(raw.replace(b"NTP", b"NTQ"), signers)


# ------------------------------------------------------------------ crafted signatures


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _pub_blob(key: SigningKey, keytype: bytes = b"ssh-ed25519") -> bytes:
    return _string(keytype) + _string(bytes(key.verify_key))


def _key_line(key: SigningKey) -> str:
    return "ssh-ed25519 " + base64.b64encode(_pub_blob(key)).decode()


def _sshsig_blob(key: SigningKey, payload: bytes, *, namespace: bytes = b"git", hash_alg: bytes = b"sha256",
                 version: int = 1, magic: bytes = b"SSHSIG", keytype: bytes = b"ssh-ed25519",
                 sigtype: bytes = b"ssh-ed25519", reserved: bytes = b"") -> bytes:
    digest = (hashlib.sha512 if hash_alg == b"sha512" else hashlib.sha256)(payload).digest()
    signed = b"SSHSIG" + _string(namespace) + _string(reserved) + _string(hash_alg) + _string(digest)
    raw = key.sign(signed).signature
    return (magic + struct.pack(">I", version) + _string(_pub_blob(key, keytype)) + _string(namespace)
            + _string(reserved) + _string(hash_alg) + _string(_string(sigtype) + _string(raw)))


def _armor(blob: bytes) -> bytes:
    text = base64.b64encode(blob).decode()
    lines = [text[i:i + 70] for i in range(0, len(text), 70)]
    return ("-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n").encode()


PAYLOAD = (b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"
           b"author Test Operator <operator@example.invalid> 1700000000 +0000\n"
           b"committer Test Operator <operator@example.invalid> 1700000000 +0000\n"
           b"\nRelease 42\n")


def _commit_with(armored: bytes, payload: bytes = PAYLOAD) -> bytes:
    header, body = payload.split(b"\n\n", 1)
    sig_lines = armored.rstrip(b"\n").split(b"\n")
    gpgsig = b"gpgsig " + sig_lines[0] + b"\n" + b"".join(b" " + line + b"\n" for line in sig_lines[1:])
    return header + b"\n" + gpgsig + b"\n" + body


@pytest.fixture(scope="module")
def nacl_key() -> SigningKey:
    return SigningKey.generate()


def test_crafted_sha256_and_sha512_signatures_verify(tmp_path: Path, nacl_key: SigningKey) -> None:
    signers = _signers(f"{PRINCIPAL} {_key_line(nacl_key)}")
    for alg in (b"sha256", b"sha512"):
        armored = _armor(_sshsig_blob(nacl_key, PAYLOAD, hash_alg=alg))
        raw = _commit_with(armored)
        assert split_commit_signature(raw) == (PAYLOAD, armored)
        assert verify_commit(raw, signers) == PRINCIPAL
        # what we build is what OpenSSH accepts, so the negative cases below test the right thing
        assert _ssh_keygen_verify(tmp_path, _key_line(nacl_key), PAYLOAD, armored)


@pytest.mark.parametrize(("change", "message"), [
    ({"namespace": b"file"}, "namespace"),
    ({"hash_alg": b"sha1"}, "sha256 or sha512"),
    ({"version": 2}, "version"),
    ({"magic": b"SSHSIX"}, "magic"),
    ({"keytype": b"ssh-rsa"}, "not supported"),
    ({"sigtype": b"rsa-sha2-512"}, "not supported"),
])
def test_crafted_bad_fields_are_refused(nacl_key: SigningKey, change: dict[str, object],
                                        message: str) -> None:
    armored = _armor(_sshsig_blob(nacl_key, PAYLOAD, **change))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match=message) as info:
        verify_commit(_commit_with(armored), _signers(f"{PRINCIPAL} {_key_line(nacl_key)}"))
    assert type(info.value) is SignatureError


def test_signature_from_another_key_under_a_trusted_key_blob(nacl_key: SigningKey) -> None:
    other = SigningKey.generate()
    blob = bytearray(_sshsig_blob(other, PAYLOAD))
    blob = blob.replace(bytes(other.verify_key), bytes(nacl_key.verify_key))
    with pytest.raises(SignatureError, match="does not match"):
        verify_commit(_commit_with(_armor(bytes(blob))), _signers(f"{PRINCIPAL} {_key_line(nacl_key)}"))


def test_every_truncation_and_trailing_bytes_are_signature_errors(nacl_key: SigningKey) -> None:
    signers = _signers(f"{PRINCIPAL} {_key_line(nacl_key)}")
    blob = _sshsig_blob(nacl_key, PAYLOAD)
    for cut in range(len(blob)):
        with pytest.raises(SignatureError):
            verify_commit(_commit_with(_armor(blob[:cut])), signers)
    with pytest.raises(SignatureError, match="trailing"):
        verify_commit(_commit_with(_armor(blob + b"\0")), signers)


@pytest.mark.parametrize("armored", [
    b"-----BEGIN PGP SIGNATURE-----\n\niQEz\n-----END PGP SIGNATURE-----\n",
    b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n",
    b"-----BEGIN SSH SIGNATURE-----\n!!!!\n-----END SSH SIGNATURE-----\n",
    b"-----BEGIN SSH SIGNATURE-----\n\xff\xfe\n-----END SSH SIGNATURE-----\n",
    b"-----BEGIN SSH SIGNATURE-----\n-----END SSH SIGNATURE-----\n",
])
def test_bad_armor_is_refused(nacl_key: SigningKey, armored: bytes) -> None:
    with pytest.raises(SignatureError):
        verify_commit(_commit_with(armored), _signers(f"{PRINCIPAL} {_key_line(nacl_key)}"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_signature_blob_raises_only_signature_errors(blob: bytes) -> None:
    signers = _signers(f"{PRINCIPAL} {_key_line(SigningKey(bytes(32)))}")
    for candidate in (blob, b"SSHSIG\0\0\0\1" + blob):
        with pytest.raises(SignatureError):
            verify_commit(_commit_with(_armor(candidate)), signers)


# ------------------------------------------------------------------ commit splitting


MERGETAG = (b"mergetag object 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"
            b" type commit\n tag v1\n \n tag message\n")


def test_split_keeps_other_multiline_headers_in_the_payload() -> None:
    tree = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"
    gpgsig = b"gpgsig -----BEGIN SSH SIGNATURE-----\n AAAA\n -----END SSH SIGNATURE-----\n"
    rest = b"gpgsig-sha256 other\n\nmessage\ngpgsig not a header\n"
    payload, signature = split_commit_signature(tree + MERGETAG + gpgsig + rest)
    assert signature == b"-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n"
    assert payload == tree + MERGETAG + rest


def test_two_gpgsig_headers_are_refused(nacl_key: SigningKey) -> None:
    armored = _armor(_sshsig_blob(nacl_key, PAYLOAD))
    once = _commit_with(armored)
    twice = once.replace(b"\n\n", b"\ngpgsig x\n\n", 1)
    with pytest.raises(SignatureError, match="more than one"):
        verify_commit(twice, _signers(f"{PRINCIPAL} {_key_line(nacl_key)}"))


# ------------------------------------------------------------------ allowed signers


def test_parse_allowed_signers_forms(nacl_key: SigningKey) -> None:
    line = _key_line(nacl_key)
    signers = parse_allowed_signers(
        f"# comment\n\n   \n\"alice@example.invalid,bob\" {line} alice's key\n"
        f'carol namespaces="git,file" {line}\n\tdave {line}\n')
    assert [e.principals for e in signers.entries] == [("alice@example.invalid", "bob"), ("carol",),
                                                       ("dave",)]
    assert [e.namespaces for e in signers.entries] == [None, ("git", "file"), None]
    assert all(e.key == bytes(nacl_key.verify_key) for e in signers.entries)
    assert parse_allowed_signers("# nothing\n").entries == ()


@pytest.mark.parametrize(("text", "message"), [
    ("alice cert-authority {line}", "certificate"),
    ('alice valid-before="20300101" {line}', "validity"),
    ('alice valid-after="20200101" {line}', "validity"),
    ('alice namespaces="git",no-touch-required {line}', "unknown option"),
    ('alice namespaces="git",namespaces="file" {line}', "twice"),
    ("alice namespaces=git {line}", "namespaces="),
    ('alice namespaces="" {line}', "no namespace"),
    ('alice namespaces="git {line}', "unterminated"),
    ("alice ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ==", "not supported"),
    ("alice ssh-ed25519 !!notbase64", "base64"),
    ("alice ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "truncated"),
    ("alice ssh-ed25519", "expected"),
    ("alice {line_rsa_inside}", "not supported"),
])
def test_parse_allowed_signers_refusals(nacl_key: SigningKey, text: str, message: str) -> None:
    line = _key_line(nacl_key)
    inside_rsa = "ssh-ed25519 " + base64.b64encode(_pub_blob(nacl_key, b"ssh-rsa")).decode()
    with pytest.raises(ConfigError, match=message):
        parse_allowed_signers(text.format(line=line, line_rsa_inside=inside_rsa))


_SIGNER_CHARS = [*'ab ,="!*#\t\nssh-ed25519AAAC3NzaC1lZDI1NTE5', "\x00", "é"]
_COMMIT_PREFIXES = [b"", b"gpgsig ", b"gpgsig -----BEGIN SSH SIGNATURE-----\n "]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(_SIGNER_CHARS), max_size=120))
def test_fuzz_allowed_signers_raise_only_config_errors(text: str) -> None:
    try:
        result = parse_allowed_signers(text)
    except ConfigError:
        return
    assert all(len(entry.key) == 32 and entry.principals for entry in result.entries)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(_COMMIT_PREFIXES))
def test_fuzz_raw_commit_raises_only_signature_errors(data: bytes, prefix: bytes) -> None:
    with pytest.raises(SignatureError):
        verify_commit(prefix + data, AllowedSigners(()))
