"""`fleetctl secret`: seal from stdin, inspect, add and remove recipients, one-line errors."""

from __future__ import annotations

import io
import json
import stat
import sys
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from edge_core.errors import NotARecipientError
from edge_core.trust import sealed
from edge_core.trust.keys import format_encryption_public, generate_encryption_key, load_encryption_key
from fleet_server.fleetctl import main

VALUE = b"  token with spaces and a trailing newline\n"


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def _pub(key: PrivateKey) -> str:
    return format_encryption_public(key.public_key)


@pytest.fixture
def escrow(tmp_path: Path) -> tuple[Path, PrivateKey]:
    path = tmp_path / "escrow.key"
    return path, generate_encryption_key(path)


def test_seal_to_stdout_keeps_the_value_byte_for_byte(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    devices = [PrivateKey.generate() for _ in range(2)]
    _stdin(monkeypatch, VALUE)
    code = main(["secret", "seal", "--to", _pub(devices[0]), "--to", _pub(devices[1]), "--id", "api-token",
                 "--version", "4"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    document = out.encode()
    for device in devices:
        assert sealed.open_sealed(document, expected_id="api-token", key=device) == VALUE
    assert sealed.inspect(document).version == 4
    assert "token with spaces" not in out


def test_seal_to_file_and_inspect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    device = PrivateKey.generate()
    target = tmp_path / "secrets" / "db.sealed.json"
    target.parent.mkdir()
    _stdin(monkeypatch, b"hunter2")
    assert main(["secret", "seal", "--to", _pub(device), "--id", "db", "--out", str(target)]) == 0
    out, _ = capsys.readouterr()
    assert out == ""
    assert sealed.open_sealed(target.read_bytes(), expected_id="db", key=device) == b"hunter2"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["db.sealed.json"]

    assert main(["secret", "inspect", str(target)]) == 0
    out, _ = capsys.readouterr()
    assert out == f"id: db\nversion: 1\nrecipients:\n  {_pub(device)}\n"
    assert main(["secret", "inspect", str(target), "--json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == {"id": "db", "version": 1, "recipients": [_pub(device)]}
    assert "hunter2" not in out


def test_seal_refusals_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    device = PrivateKey.generate()
    cases = [
        (b"", ["--to", _pub(device), "--id", "x"], "stdin"),
        (b"v", ["--to", "ed25519:" + "A" * 43 + "=", "--id", "x"], "edge-agent init"),
        (b"v", ["--to", "x25519:not-base64", "--id", "x"], "base64"),
        (b"v", ["--to", "nonsense", "--id", "x"], "x25519:"),
        (b"v", ["--to", _pub(device), "--id", "../etc"], "secret id"),
        (b"\0" * (sealed.MAX_PLAINTEXT_BYTES + 1), ["--to", _pub(device), "--id", "x"], "larger than"),
    ]
    for data, args, message in cases:
        _stdin(monkeypatch, data)
        assert main(["secret", "seal", *args]) == 1, args
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("fleetctl: "), err
        assert err.count("\n") == 1, err
        assert message in err, err
        assert "Traceback" not in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["secret"], ["secret", "seal", "--id", "x"], ["secret", "seal", "--to", "k", "--id", "x",
                                                                 "--version", "0"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["secret", "seal", "--help"])
    assert info.value.code == 0
    assert "--to" in capsys.readouterr().out


def test_add_and_remove_recipient_rewrite_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str],
                                                   escrow: tuple[Path, PrivateKey]) -> None:
    escrow_file, escrow_key = escrow
    device_a, device_b = PrivateKey.generate(), PrivateKey.generate()
    target = tmp_path / "wifi.sealed.json"
    _stdin(monkeypatch, b"psk=correct horse")
    assert main(["secret", "seal", "--to", _pub(escrow_key), "--to", _pub(device_a), "--id", "wifi",
                 "--out", str(target)]) == 0
    before = json.loads(target.read_bytes())

    assert main(["secret", "add-recipient", str(target), "--key", str(escrow_file),
                 "--to", _pub(device_b)]) == 0
    out, _ = capsys.readouterr()
    assert "3 recipient(s)" in out
    added = json.loads(target.read_bytes())
    assert added["ciphertext"] == before["ciphertext"]
    assert sealed.open_sealed(target.read_bytes(), expected_id="wifi", key=device_b) == b"psk=correct horse"

    assert main(["secret", "remove-recipient", str(target), "--key", str(escrow_file),
                 "--remove", _pub(device_a)]) == 0
    out, _ = capsys.readouterr()
    assert "2 recipient(s)" in out
    removed = json.loads(target.read_bytes())
    assert removed["ciphertext"] != added["ciphertext"]
    with pytest.raises(NotARecipientError):
        sealed.open_sealed(target.read_bytes(), expected_id="wifi", key=device_a)
    assert sealed.open_sealed(target.read_bytes(), expected_id="wifi", key=device_b) == b"psk=correct horse"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escrow.key", "wifi.sealed.json"]


def test_recipient_changes_need_an_opener_that_is_a_recipient(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        escrow: tuple[Path, PrivateKey]) -> None:
    escrow_file, _ = escrow
    device = PrivateKey.generate()
    target = tmp_path / "s.sealed.json"
    _stdin(monkeypatch, b"v")
    assert main(["secret", "seal", "--to", _pub(device), "--id", "s", "--out", str(target)]) == 0
    original = target.read_bytes()
    capsys.readouterr()
    stranger = _pub(PrivateKey.generate())
    for argv in (["add-recipient", str(target), "--key", str(escrow_file), "--to", stranger],
                 ["remove-recipient", str(target), "--key", str(escrow_file), "--remove", _pub(device)]):
        assert main(["secret", *argv]) == 1
        err = capsys.readouterr().err
        assert "is not a recipient" in err
        assert err.count("\n") == 1
        assert target.read_bytes() == original


def test_inspect_of_a_missing_or_malformed_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["secret", "inspect", str(tmp_path / "missing.sealed.json")]) == 1
    assert capsys.readouterr().err.startswith("fleetctl: ")
    bad = tmp_path / "bad.sealed.json"
    bad.write_text('{"type": "edge-fleet/sealed-secret"}\n')
    assert main(["secret", "inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "sealed secret fields are wrong" in err
    assert err.count("\n") == 1


def test_keygen_writes_an_escrow_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "escrow.key"
    assert main(["secret", "keygen", "--out", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == _pub(load_encryption_key(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["secret", "keygen", "--out", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_secret_commands_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["secret", "keygen", "--out", str(tmp_path / "escrow.key"), "-o", "json"]) == 0
    escrow = json.loads(capsys.readouterr().out)
    assert (escrow["type"], escrow["path"]) == ("x25519", str(tmp_path / "escrow.key"))
    assert main(["secret", "keygen", "--out", str(tmp_path / "dev.key"), "--json"]) == 0
    device = json.loads(capsys.readouterr().out)["public_key"]
    sealed_file = tmp_path / "s.sealed.json"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hunter2")))
    assert main(["secret", "seal", "--id", "pw", "--to", escrow["public_key"], "--out",
                          str(sealed_file), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"id": "pw", "version": 1, "recipients": [escrow["public_key"]],
                               "path": str(sealed_file)}
    assert "hunter2" not in out
    key = str(tmp_path / "escrow.key")
    assert main(["secret", "add-recipient", str(sealed_file), "--key", key, "--to", device, "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["recipients"]) == sorted([escrow["public_key"], device])
    assert main(["secret", "remove-recipient", str(sealed_file), "--key", key, "--remove", device,
                 "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipients"] == [escrow["public_key"]]
