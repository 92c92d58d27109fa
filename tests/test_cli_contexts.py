"""fleetctl's server and token: options, then FLEET_SERVER / FLEET_TOKEN / FLEET_CONTEXT, then the
config file in $XDG_CONFIG_HOME/edge-fleet/ (0700 directory, 0600 file), against a real API server
over each store backend."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_server import fleetctl
from fleet_server.cli.credentials import config_path, resolve_client
from fleet_server.config import StoreConfig
from fleet_server.errors import UsageError
from tests.support.api_server import READER, Api, running_api
from tests.support.mirror import free_port


@pytest.fixture(scope="module")
def guarded_api(tmp_path_factory: pytest.TempPathFactory,
                new_store: Callable[[], StoreConfig]) -> Iterator[Api]:
    with running_api(tmp_path_factory.mktemp("guarded-api"), read=True, store_config=new_store()) as api:
        yield api


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = fleetctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _set(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str,
         stdin: str = "") -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    code, _, err = run(capsys, "config", "set", *argv)
    assert code == 0, err


def test_fleet_token_from_the_environment_reaches_the_server(
        guarded_api: Api, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_SERVER", guarded_api.url)
    code, _, err = run(capsys, "devices")
    assert err == "fleetctl: fleet server answered 401: read token required\n"
    monkeypatch.setenv("FLEET_TOKEN", READER)
    code, out, err = run(capsys, "devices", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["total"] == 4


def test_a_saved_context_is_used_and_kept_private(guarded_api: Api, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _set(monkeypatch, capsys, "--context", "lab", "--server", guarded_api.url, "--token-stdin", stdin=READER)
    path = config_path()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    code, out, err = run(capsys, "devices", "--json")
    assert code == 0, err
    assert json.loads(out)["total"] == 4
    # A token file in a second context; --context picks it, FLEET_CONTEXT too.
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-it\n")
    _set(monkeypatch, capsys, "--context", "bad", "--server", guarded_api.url, "--token-file", str(wrong))
    denied = "fleetctl: fleet server answered 403: invalid token\n"
    assert run(capsys, "devices", "--context", "bad")[2] == denied
    monkeypatch.setenv("FLEET_CONTEXT", "bad")
    assert run(capsys, "devices")[0] == 1
    assert run(capsys, "devices", "--context", "lab")[0] == 0  # the option beats the environment
    monkeypatch.delenv("FLEET_CONTEXT")
    assert run(capsys, "devices")[0] == 0  # the first context saved stays current
    # A config file holding a token that others may read is refused, as ssh refuses such a key.
    path.chmod(0o644)
    code, _, err = run(capsys, "devices")
    assert code == 1
    assert err == f"fleetctl: {path} holds a token and group or others may read it: chmod 600 {path}\n"


def test_precedence_is_option_then_environment_then_file(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    token_file = tmp_path / "opt.token"
    token_file.write_text("from-option\n")
    _set(monkeypatch, capsys, "--server", "http://file.invalid:1", "--token-stdin", stdin="from-file")
    client = resolve_client(None, None)
    assert (client.server, client.token) == ("http://file.invalid:1", "from-file")
    monkeypatch.setenv("FLEET_SERVER", "http://env.invalid:2")
    monkeypatch.setenv("FLEET_TOKEN", "from-env")
    client = resolve_client(None, None)
    assert (client.server, client.token) == ("http://env.invalid:2", "from-env")
    client = resolve_client("http://opt.invalid:3", token_file)
    assert (client.server, client.token) == ("http://opt.invalid:3", "from-option")
    assert "from-" not in repr(client)
    with pytest.raises(UsageError, match="no context 'nope' \\(known: default\\)"):
        resolve_client(None, None, "nope")


def test_a_typo_in_the_config_file_names_the_nearest_key(capsys: pytest.CaptureFixture[str]) -> None:
    path = config_path()
    path.parent.mkdir(parents=True)
    path.write_text("current: a\ncontexts:\n  a: {server: 'http://127.0.0.1:1', tokn_file: x}\n")
    code, _, err = run(capsys, "devices")
    assert code == 1
    assert err == "fleetctl: contexts.a.tokn_file: unknown key; did you mean contexts.a.token_file?\n"


def test_http_timeout_is_one_name_and_timeout_its_deprecated_spelling(
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for option in ("--http-timeout", "--timeout"):
        for argv in (["devices"], ["device", "cam-01"], ["audit"], ["release", "list"]):
            code, _, err = run(capsys, *argv, "--server", url, option, "2")
            assert code == 1
            assert err.startswith(f"fleetctl: cannot reach the fleet server at {url}")
    for argv in (["rollout", "status"], ["rollout", "watch"], ["rollout", "abort", "r1", "--reason", "x"]):
        code, _, err = run(capsys, *argv, "--server", url, "--http-timeout", "2")
        assert code == 1, err
    with pytest.raises(SystemExit):
        fleetctl.main(["devices", "--help"])
    out = capsys.readouterr().out
    assert "--timeout SECONDS     deprecated spelling of --http-timeout" in out


def test_a_new_key_directory_is_private(capsys: pytest.CaptureFixture[str]) -> None:
    keys = config_path().parent / "keys"
    code, _, err = run(capsys, "keys", "generate", "--out", str(keys / "alice.key"))
    assert code == 0, err
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(keys / "alice.key").st_mode) == 0o600


def test_a_key_written_into_a_shared_directory_is_warned_about(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / ".edge-fleet"  # what earlier versions created 0755
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    code, _, err = run(capsys, "keys", "generate", "--out", str(old / "alice.key"))
    assert code == 0
    assert err == (f"fleetctl: warning: {old} is open to group or others (mode 755); keep keys in a "
                   f"private directory: chmod 700 {old}\n")
    old.chmod(0o700)
    code, _, err = run(capsys, "keys", "generate", "--out", str(old / "bob.key"))
    assert (code, err) == (0, "")
