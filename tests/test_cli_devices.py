"""`fleetctl devices` and `fleetctl device` against a real API server on loopback, over each store
backend (the module's servers are shared: started once per backend)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_server import fleetctl
from fleet_server.cli.devices import format_device, server_url
from fleet_server.config import StoreConfig
from fleet_server.errors import UsageError
from tests.support.api_server import ADMIN, READER, Api, running_api
from tests.support.mirror import free_port


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory, new_store: Callable[[], StoreConfig]) -> Iterator[Api]:
    with running_api(tmp_path_factory.mktemp("open-api"), store_config=new_store()) as api:
        yield api


@pytest.fixture(scope="module")
def guarded_api(tmp_path_factory: pytest.TempPathFactory,
                new_store: Callable[[], StoreConfig]) -> Iterator[Api]:
    with running_api(tmp_path_factory.mktemp("guarded-api"), read=True, store_config=new_store()) as api:
        yield api


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run fleetctl in-process; return (exit code, stdout, stderr)."""
    code = fleetctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _table_ids(out: str) -> list[str]:
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "ONLINE", "SYNC"]
    return [line.split()[0] for line in lines[1:-1]]


def test_devices_table(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "devices", "--server", open_api.url)
    assert (code, err) == (0, "")
    assert _table_ids(out) == ["cam-01", "cam-02", "gw-01", "gw-02"]
    assert out.splitlines()[-1] == "4 device(s)"
    cam = out.splitlines()[1].split()
    assert cam[:5] == ["cam-01", "yes", "in_sync", "4", "c" * 12]
    assert cam[-1] == "ring=canary,site=north"


def test_devices_filters(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--label", "ring=canary", "--online")
    assert code == 0
    assert _table_ids(out) == ["cam-01"]
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--label", "ring=canary",
                       "--label", "site=south")
    assert _table_ids(out) == ["gw-01"]
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--state", "failed")
    assert _table_ids(out) == ["cam-02"]
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--offline", "--limit", "2")
    assert _table_ids(out) == ["cam-02", "gw-01"]
    assert out.splitlines()[-1] == "2 of 3 device(s)"


def test_devices_json(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["total"] == 4
    assert [d["id"] for d in doc["devices"]] == ["cam-01", "cam-02", "gw-01", "gw-02"]


def test_device_detail(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "device", "cam-01", "--server", open_api.url)
    assert code == 0
    assert "device:      cam-01" in out
    assert "sync state:  in_sync" in out
    assert "sync_succeeded  release 4" in out
    assert "1 check(s), all passing" in out
    code, out, _ = run(capsys, "device", "cam-01", "--server", open_api.url, "--json")
    doc = json.loads(out)
    assert doc["device"]["labels"] == {"ring": "canary", "site": "north"}
    assert doc["events"][0]["type"] == "sync_succeeded"


def test_device_detail_says_how_often_the_last_failure_repeated() -> None:
    device = {"id": "cam-02", "last_error": "sync_refused (release 5): commit is not SSH-signed",
              "repeat_count": 12, "repeat_last_seen": 1_796_468_400.0}
    out = format_device({"device": device}, now=1_796_468_460.0)
    assert "last error:  sync_refused (release 5): commit is not SSH-signed" in out
    assert "repeated:    12 sync(s) in a row, the last at 2026-12-05T11:00:00Z (60s ago)" in out
    assert "repeated" not in format_device({"device": {**device, "repeat_count": None}}, now=1_796_468_460.0)


def test_unknown_device_is_one_line_exit_1(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "device", "nope-01", "--server", open_api.url)
    assert (code, out) == (1, "")
    assert err == "fleetctl: fleet server answered 404: no device nope-01\n"


def test_server_from_environment(open_api: Api, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_SERVER", open_api.url + "/")
    code, out, _ = run(capsys, "devices", "--json")
    assert code == 0
    assert json.loads(out)["total"] == 4


def test_server_down_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "devices", "--server", url, "--timeout", "3")
    assert (code, out) == (1, "")
    assert err.startswith(f"fleetctl: cannot reach the fleet server at {url}: ")
    assert err.count("\n") == 1
    code, _, err = run(capsys, "device", "cam-01", "--server", url, "--timeout", "3")
    assert code == 1
    assert err.count("\n") == 1


def test_read_token(guarded_api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "devices", "--server", guarded_api.url)
    assert code == 1
    assert err == "fleetctl: fleet server answered 401: read token required\n"
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-it\n")
    code, _, err = run(capsys, "devices", "--server", guarded_api.url, "--token-file", str(wrong))
    assert err == "fleetctl: fleet server answered 403: invalid token\n"
    for secret in (READER, ADMIN):
        token = tmp_path / "good.token"
        token.write_text(secret + "\n")
        code, out, _ = run(capsys, "devices", "--server", guarded_api.url, "--token-file", str(token),
                           "--json")
        assert code == 0
        assert json.loads(out)["total"] == 4


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "devices", "--label", "no-equals-sign")
    assert code == 1
    assert err == "fleetctl: --label must be KEY=VALUE, got 'no-equals-sign'\n"
    code, _, err = run(capsys, "devices", "--server", "ftp://127.0.0.1:1")
    assert code == 1
    assert "must be http://" in err
    code, _, err = run(capsys, "devices", "--token-file", str(tmp_path / "missing"))
    assert code == 1
    assert err.startswith("fleetctl: cannot read token file")
    with pytest.raises(SystemExit) as exit_info:
        fleetctl.main(["devices", "--online", "--offline"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        fleetctl.main(["devices", "--limit", "0"])


def test_server_url_defaults() -> None:
    assert server_url(None) == "http://127.0.0.1:8080"
    assert server_url("https://fleet.example.invalid:8443/") == "https://fleet.example.invalid:8443"
    with pytest.raises(UsageError):
        server_url("127.0.0.1:8080")
