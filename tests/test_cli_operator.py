"""The operator's loop from `fleetctl`: sign (lint first), durations, timeouts, history and audit,
paging, key hints, help examples, and `fleet-server` without its extras.

Real key files, real repos, a real API server (uvicorn on 127.0.0.1 over a real store, on each
backend: the module's servers are started once per backend).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from edge_agent.report import build as reporter
from edge_core.durations import parse_cli_seconds, parse_seconds
from edge_core.trust.manifest import MANIFEST_PATH, MAX_MESSAGE_CHARS, parse_time
from fleet_server import fleetctl
from fleet_server.authoring.manifest import read_unverified
from fleet_server.cli.devices import SYNC_STATES
from fleet_server.cli.release import NO_LINT_NOTE
from fleet_server.config import StoreConfig
from fleet_server.extras import exit_without_server_extras
from tests.support.api_server import COMMIT, READER, Api, running_api
from tests.support.mirror import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

BUNDLE = """targets:
  - labels: {role: web}
resources:
  - kind: {kind}
    path: /etc/nginx/nginx.conf
    source: nginx.conf
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run fleetctl in-process; return (exit code, stdout, stderr)."""
    code = fleetctl.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """Run fleetctl expecting argparse to refuse the command line; return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        fleetctl.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


def make_repo(root: Path, kind: str = "file") -> Path:
    repo = root / "config"
    (repo / "bundles" / "web").mkdir(parents=True)
    (repo / "fleet.yaml").write_text("description: operator test fleet\n")
    (repo / "bundles" / "web" / "bundle.yaml").write_text(BUNDLE.replace("{kind}", kind))
    (repo / "bundles" / "web" / "nginx.conf").write_text("server {}\n")
    return repo


@pytest.fixture
def key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """One ed25519 key file and its public key."""
    path = tmp_path / "keys" / "alice.key"
    code, out, _ = run(capsys, "keys", "generate", "--out", path)
    assert code == 0
    return path, out.strip()


# --- sign runs lint first ----------------------------------------------------------------------------

def test_sign_refuses_a_repo_that_fails_lint(tmp_path: Path, key: tuple[Path, str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path, kind="fiel")
    code, out, err = run(capsys, "release", "sign", repo, "--key", key[0])
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines[0].startswith("bundles/web/bundle.yaml:4: error: ")
    assert "fiel" in lines[0]
    assert lines[-1].startswith(f"fleetctl: not signed: {repo} has 1 lint error(s)")
    assert "--no-lint" in lines[-1]
    assert "Traceback" not in err
    assert not (repo / MANIFEST_PATH).exists()


def test_no_lint_signs_and_the_signed_message_records_it(tmp_path: Path, key: tuple[Path, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path, kind="fiel")
    code, out, err = run(capsys, "release", "sign", repo, "--key", key[0], "--no-lint", "--message", "hotfix")
    assert code == 0
    assert err.startswith("fleetctl: warning: signing without lint (--no-lint)")
    note = f"{NO_LINT_NOTE} hotfix"
    assert f"message: {note}" in out
    assert read_unverified((repo / MANIFEST_PATH).read_bytes())["message"] == note
    code, out, _ = run(capsys, "release", "verify", repo, "--trust", key[1])
    assert code == 0
    assert out.splitlines()[-1] == f"message: {note}"   # under the signatures: verify passes with it
    code, _, err = run(capsys, "release", "sign", repo, "--key", key[0], "--no-lint",
                       "--message", "x" * MAX_MESSAGE_CHARS)
    assert code == 1
    assert err.count("\n") == 1
    assert "--message is too long" in err


# --- durations need a unit ---------------------------------------------------------------------------

def test_expires_bare_number_is_refused_and_units_work(tmp_path: Path, key: tuple[Path, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    code, out, err = run(capsys, "release", "sign", repo, "--key", key[0], "--expires", "3")
    assert (code, out) == (1, "")
    assert err == ("fleetctl: --expires: '3' has no unit: use a number with a unit, such as 90m, 12h, "
                   "3d or 2w (3s if you mean seconds)\n")
    assert not (repo / MANIFEST_PATH).exists()
    for text, span in (("3d", timedelta(days=3)), ("2w", timedelta(weeks=2)), ("1d12h", timedelta(hours=36))):
        code, out, err = run(capsys, "release", "sign", repo, "--key", key[0], "--expires", text, "--json")
        assert (code, err) == (0, ""), err
        doc = json.loads(out)
        assert parse_time(doc["expires"], "expires") - parse_time(doc["created"], "created") == span


@pytest.mark.parametrize("text", ["3y", "3 days", "d", "12h1d", "-1d"])
def test_bad_duration_is_one_clean_message(tmp_path: Path, key: tuple[Path, str], text: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    code, _, err = run(capsys, "release", "sign", repo, "--key", key[0], f"--expires={text}")
    assert code == 1
    assert err == (f"fleetctl: --expires: {text!r} is not a duration: use a number with a unit, such as "
                   "90m, 12h, 3d or 2w\n")


def test_config_files_keep_bare_seconds_the_command_line_does_not() -> None:
    assert parse_seconds("30") == 30.0          # agent.yaml, server.yaml, fleet.yaml: documented
    assert parse_seconds(30) == 30.0
    assert parse_cli_seconds("90m") == 5400.0
    with pytest.raises(ValueError, match="has no unit"):
        parse_cli_seconds("30")
    with pytest.raises(ValueError, match="has no unit"):
        parse_cli_seconds(" 0.5 ")


# --- --timeout is a positive number ------------------------------------------------------------------

@pytest.mark.parametrize("command", [["devices"], ["device", "cam-01"], ["enroll", "cam-09"],
                                     ["release", "list"], ["release", "show", "4"], ["audit"]])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "ten"])
def test_timeout_must_be_a_positive_number(command: list[str], value: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(capsys, *command, "--server", f"http://127.0.0.1:{free_port()}", "--timeout", value)
    assert f"argument --timeout: must be a positive number of seconds (at most 86400), got {value!r}" in line


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "ten"])
def test_rollout_timeouts_must_be_positive_and_finite(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    line = usage_error(capsys, "rollout", "status", "--server", server, "--http-timeout", value)
    assert f"--http-timeout: must be a positive number of seconds (at most 86400), got {value!r}" in line
    line = usage_error(capsys, "rollout", "watch", "r-1", "--server", server, "--timeout", value)
    assert "argument --timeout:" in line


# --- a real API server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory, new_store: Callable[[], StoreConfig]) -> Iterator[Api]:
    with running_api(tmp_path_factory.mktemp("operator-api"), store_config=new_store()) as api:
        api.store.record_release(5, "d" * 40, ["ed25519:key", "ed25519:other"], 1_900_000_000.0,
                                 committed_at=1_899_999_990.0)
        api.store.add_audit("bob", "rollout.resume", "r-1", "canaries fine", {"wave": 2})
        for i in range(1003):
            api.store.register_device(f"zz-{i:04d}")
        yield api


@pytest.fixture(scope="module")
def guarded_api(tmp_path_factory: pytest.TempPathFactory,
                new_store: Callable[[], StoreConfig]) -> Iterator[Api]:
    with running_api(tmp_path_factory.mktemp("operator-guarded"), read=True, store_config=new_store()) as api:
        yield api


def test_devices_pages_past_a_thousand(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    total = 4 + 1003
    code, out, _ = run(capsys, "devices", "--server", open_api.url)
    assert code == 0
    assert out.splitlines()[-1] == f"1000 of {total} device(s)"
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--offset", "1000")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == [f"zz-{i:04d}" for i in range(996, 1003)]
    assert lines[-1] == f"7 of {total} device(s): numbers 1001 to {total}"
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--offset", "2000", "--json")
    doc = json.loads(out)
    assert (code, doc["devices"], doc["total"], doc["offset"]) == (0, [], total, 2000)
    code, out, _ = run(capsys, "devices", "--server", open_api.url, "--offset", "2000")
    assert out.splitlines()[-1] == f"0 of {total} device(s): --offset 2000 is past the last one"


def test_unknown_state_is_refused_and_every_reported_state_is_accepted(
        open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert set(SYNC_STATES) == set(reporter.SYNC_STATES.values()) | {"unknown", "drifted"}
    line = usage_error(capsys, "devices", "--server", open_api.url, "--state", "insync")
    assert "argument --state: invalid choice: 'insync'" in line
    assert "in_sync" in line
    for state in SYNC_STATES:
        code, out, err = run(capsys, "devices", "--server", open_api.url, "--state", state, "--json")
        assert (code, err) == (0, "")
        assert all(d["sync_state"] == state for d in json.loads(out)["devices"])


def test_release_list_and_show(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "release", "list", "--server", open_api.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["RELEASE", "COMMIT", "COMMITTED", "RECORDED", "SIGNERS"]
    assert lines[1].split() == ["5", "d" * 12, "2030-03-17T17:46:30Z", "2030-03-17T17:46:40Z",
                                "ed25519:key,ed25519:other"]
    assert lines[2].split()[:2] == ["4", "c" * 12]
    assert lines[-1] == "2 release(s)"
    code, out, _ = run(capsys, "release", "list", "--server", open_api.url, "--limit", "1")
    assert out.splitlines()[-1] == "1 release(s): the newest 1; --limit up to 1000 shows more"
    code, out, _ = run(capsys, "release", "list", "--server", open_api.url, "--json")
    assert [r["version"] for r in json.loads(out)["releases"]] == [5, 4]

    code, out, err = run(capsys, "release", "show", "4", "--server", open_api.url)
    assert (code, err) == (0, "")
    assert f"commit:      {COMMIT}" in out.splitlines()
    assert "devices:     3 (reporting this release now)" in out.splitlines()
    code, out, _ = run(capsys, "release", "show", "5", "--server", open_api.url, "--json")
    doc = json.loads(out)
    assert (doc["release"]["commit"], doc["devices"]) == ("d" * 40, 0)
    code, _, err = run(capsys, "release", "show", "99", "--server", open_api.url)
    assert code == 1
    assert err == ("fleetctl: the fleet server recorded no release 99 (newest: 5; see 'fleetctl release "
                   "list')\n")
    assert "a release number is 1 or more" in usage_error(capsys, "release", "show", "0")


def test_audit(open_api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "--server", open_api.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "ACTION", "TARGET", "REASON", "DETAIL"]
    assert lines[1].split()[1:] == ["bob", "rollout.resume", "r-1", "canaries", "fine", '{"wave":2}']
    assert lines[2].split()[1:4] == ["alice", "rollout.pause", "r-1"]
    assert lines[-1] == "2 entries"
    code, out, _ = run(capsys, "audit", "--server", open_api.url, "--limit", "1")
    assert out.splitlines()[-1] == "1 entry: the newest 1; --limit up to 1000 shows more"
    code, out, _ = run(capsys, "audit", "--server", open_api.url, "--json")
    assert json.loads(out) == open_api.get("/api/v1/audit").json()


def test_history_uses_the_token_and_fails_in_one_line(guarded_api: Api, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["release", "list"], ["release", "show", "4"], ["audit"]):
        code, _, err = run(capsys, *command, "--server", guarded_api.url)
        assert code == 1
        assert err.startswith("fleetctl: fleet server answered 401")
        assert err.count("\n") == 1
    token = tmp_path / "read.token"
    token.write_text(READER + "\n")
    for command in (["release", "list"], ["release", "show", "4"], ["audit"]):
        code, _, err = run(capsys, *command, "--server", guarded_api.url, "--token-file", token)
        assert (code, err) == (0, "")
    down = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "audit", "--server", down, "--timeout", "2")
    assert code == 1
    assert err.startswith(f"fleetctl: cannot reach the fleet server at {down}")
    assert err.count("\n") == 1


# --- key hints ---------------------------------------------------------------------------------------

def test_generate_over_an_existing_key_mentions_force(tmp_path: Path, key: tuple[Path, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    before = key[0].read_bytes()
    code, _, err = run(capsys, "keys", "generate", "--out", key[0])
    assert code == 1
    assert err.count("\n") == 1
    assert "exists; refusing to overwrite a key (add --force" in err
    assert key[0].read_bytes() == before
    code, out, _ = run(capsys, "keys", "generate", "--out", key[0], "--force")
    assert code == 0
    assert out.strip() != key[1]
    assert key[0].read_bytes() != before


def test_signing_with_the_wrong_kind_of_key_says_which(tmp_path: Path, key: tuple[Path, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    device = tmp_path / "device.key"
    code, device_public, _ = run(capsys, "keys", "generate", "--out", device, "--type", "x25519")
    assert code == 0
    public_file = tmp_path / "alice.pub"
    public_file.write_text(key[1] + "\n")           # as people store public keys: 0644
    x_public_file = tmp_path / "device.pub"
    x_public_file.write_text(device_public)
    cases = ((device, "holds an x25519 private key"), (public_file, "holds an ed25519 public key"),
             (x_public_file, "holds an x25519 public key"))
    for path, kind in cases:
        for action in ("sign", "cosign"):
            code, _, err = run(capsys, "release", action, repo, "--key", path)
            assert code == 1
            assert err.count("\n") == 1
            assert kind in err
            assert "signing needs an ed25519 private key file" in err
        code, _, err = run(capsys, "keys", "rotate", repo, "--trust", key[1], "--threshold", "1",
                           "--key", path)
        assert code == 1
        assert kind in err
    assert not (repo / MANIFEST_PATH).exists()
    for path, prefix in ((public_file, "ed25519:"), (x_public_file, "x25519:")):
        code, _, err = run(capsys, "keys", "public", path)
        assert code == 1
        assert err == (f"fleetctl: {path} holds a public key already ({prefix}...); 'keys public' reads "
                       "the private key file it came from\n")


# --- help with examples ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["release", "sign"], ["release", "cosign"], ["release", "verify"], ["release", "list"],
    ["release", "show"], ["keys", "generate"], ["keys", "public"], ["keys", "rotate"], ["devices"],
    ["device"], ["enroll"], ["audit"], ["secret", "inspect"], ["secret", "keygen"]])
def test_help_ends_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fleetctl.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    examples = out.split("\nexamples:\n", 1)[1]
    first = next(line for line in examples.splitlines() if not line.lstrip().startswith("#")).split()
    assert first[:1 + len(command)] == ["fleetctl", *command]


# --- fleet-server without its extras -----------------------------------------------------------------

@pytest.mark.parametrize("module", ["uvicorn", "fastapi", "prometheus_client", "jinja2"])
def test_fleet_server_without_the_server_extras_says_what_to_install(module: str) -> None:
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['fleet-server', '--version']\n"
            "from fleet_server.main import main\nraise SystemExit(main())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == ("fleet-server needs the server extras: pip install 'edge-fleet[server]' "
                           f"(missing: {module})\n")


def test_a_missing_module_of_the_project_itself_is_not_blamed_on_the_extras() -> None:
    for exc in (ImportError("broken install", name="fleet_server.store"), ImportError("no name")):
        with pytest.raises(ImportError) as raised:
            exit_without_server_extras(exc)
        assert raised.value is exc

