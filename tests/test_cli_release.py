"""`fleetctl keys` and `fleetctl release` end to end: real key files, real repos, real `git`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_core.trust.keys import load_signing_key
from edge_core.trust.manifest import MANIFEST_PATH
from fleet_server.authoring.manifest import read_unverified
from fleet_server.cli.release import parse_duration
from fleet_server.errors import UsageError
from fleet_server.fleetctl import main
from fleet_server.signing import collect_release_files, sign_release

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run fleetctl in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_failure(code: int, err: str) -> str:
    assert code == 1
    assert err.startswith("fleetctl: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, tuple[Path, str]]:
    """Three ed25519 key files: name -> (path, public key)."""
    out: dict[str, tuple[Path, str]] = {}
    for name in ("alice", "bob", "carol"):
        path = tmp_path / "keys" / f"{name}.key"
        code, stdout, _ = run(capsys, "keys", "generate", "--out", path)
        assert code == 0
        out[name] = (path, stdout.strip())
    return out


WEB_BUNDLE = """targets:
  - labels: {role: web}
resources:
  - kind: file
    path: /etc/nginx/nginx.conf
    source: nginx.conf
"""


def make_repo(root: Path) -> Path:
    """A config repo that passes `fleetctl lint` (sign refuses one that does not)."""
    repo = root / "config"
    (repo / "bundles" / "web").mkdir(parents=True)
    (repo / "fleet.yaml").write_text("description: test fleet\n")
    (repo / "bundles" / "web" / "bundle.yaml").write_text(WEB_BUNDLE)
    (repo / "bundles" / "web" / "nginx.conf").write_text("server {}\n")
    return repo


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=60)


# --- keys ------------------------------------------------------------------------------------------

def test_keys_generate_writes_0600_and_prints_public_key(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "op.key"
    code, out, _ = run(capsys, "keys", "generate", "--out", path, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["public_key"].startswith("ed25519:")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, out, _ = run(capsys, "keys", "public", path)
    assert (code, out.strip()) == (0, doc["public_key"])


def test_keys_generate_x25519_and_public(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "device.key"
    code, out, _ = run(capsys, "keys", "generate", "--out", path, "--type", "x25519")
    assert code == 0
    assert out.startswith("x25519:")
    code, again, _ = run(capsys, "keys", "public", path)
    assert (code, again) == (0, out)


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "op.key"
    assert run(capsys, "keys", "generate", "--out", path)[0] == 0
    code, _, err = run(capsys, "keys", "generate", "--out", path)
    assert "refusing to overwrite" in one_line_failure(code, err)
    code, _, _ = run(capsys, "keys", "generate", "--out", path, "--force")
    assert code == 0


def test_keys_public_refuses_a_non_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk"
    path.write_text("hello\n")
    path.chmod(0o600)
    one_line_failure(*run(capsys, "keys", "public", path)[::2])


# --- sign and verify -------------------------------------------------------------------------------

def test_sign_then_verify_plain_directory(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    alice_key, alice_pub = keys["alice"]
    code, out, _ = run(capsys, "release", "sign", repo, "--key", alice_key, "--expires", "12h",
                       "--message", "first", "--json")
    assert code == 0
    summary = json.loads(out)
    assert (summary["version"], summary["files"], summary["signers"]) == (1, 3, [alice_pub])
    assert summary["message"] == "first"
    document = (repo / MANIFEST_PATH).read_bytes()
    assert set(read_unverified(document)["files"]) == {"fleet.yaml", "bundles/web/bundle.yaml",
                                                      "bundles/web/nginx.conf"}
    code, out, _ = run(capsys, "release", "verify", repo, "--trust", alice_pub, "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["ok"], result["version"], result["trust_root_version"]) == (True, 1, 1)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda repo: (repo / "fleet.yaml").write_text("reconcile_interval: 1\n"), "FileHashMismatch"),
        (lambda repo: (repo / "bundles" / "evil.yaml").write_text("x\n"), "UnlistedFile"),
        (lambda repo: (repo / "bundles" / "web" / "nginx.conf").unlink(), "FileMissing"),
    ],
)
def test_verify_refuses_changed_tree(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                     capsys: pytest.CaptureFixture[str], change: object, error: str) -> None:
    repo = make_repo(tmp_path)
    assert run(capsys, "release", "sign", repo, "--key", keys["alice"][0])[0] == 0
    change(repo)  # type: ignore[operator]
    code, out, err = run(capsys, "release", "verify", repo, "--trust", keys["alice"][1], "--json")
    one_line_failure(code, err)
    assert json.loads(out) == {"ok": False, "error": error, "reason": err.removeprefix("fleetctl: ").strip()}


def test_verify_refuses_untrusted_signer_and_threshold(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    assert run(capsys, "release", "sign", repo, "--key", keys["alice"][0])[0] == 0
    code, out, err = run(capsys, "release", "verify", repo, "--trust", keys["bob"][1], "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "UntrustedKeyError"
    code, out, err = run(capsys, "release", "verify", repo, "--trust", keys["alice"][1], "--trust",
                         keys["bob"][1], "--threshold", "2", "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "ThresholdError"


def test_cosign_reaches_threshold(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    trust = ["--trust", keys["alice"][1], "--trust", keys["bob"][1], "--trust", keys["carol"][1]]
    assert run(capsys, "release", "sign", repo, "--key", keys["alice"][0])[0] == 0
    before = read_unverified((repo / MANIFEST_PATH).read_bytes())
    assert run(capsys, "release", "verify", repo, *trust, "--threshold", "2")[0] == 1
    code, out, _ = run(capsys, "release", "cosign", repo, "--key", keys["bob"][0], "--json")
    assert code == 0
    assert json.loads(out)["signers"] == sorted([keys["alice"][1], keys["bob"][1]])
    assert read_unverified((repo / MANIFEST_PATH).read_bytes()) == before
    code, out, _ = run(capsys, "release", "verify", repo, *trust, "--threshold", "2")
    assert code == 0
    assert "verified release 1" in out


def test_cosign_refuses_when_tree_changed(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    assert run(capsys, "release", "sign", repo, "--key", keys["alice"][0])[0] == 0
    before = (repo / MANIFEST_PATH).read_bytes()
    (repo / "fleet.yaml").write_text("changed\n")
    code, _, err = run(capsys, "release", "cosign", repo, "--key", keys["bob"][0])
    assert "no longer matches" in one_line_failure(code, err)
    assert (repo / MANIFEST_PATH).read_bytes() == before


def test_cosign_without_manifest_fails(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    code, _, err = run(capsys, "release", "cosign", repo, "--key", keys["bob"][0])
    assert "no release manifest" in one_line_failure(code, err)


def test_versions_floors_and_rollback(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    key, pub = keys["alice"]
    assert run(capsys, "release", "sign", repo, "--key", key)[0] == 0
    code, out, _ = run(capsys, "release", "sign", repo, "--key", key, "--floor", "2", "--json")
    assert (code, json.loads(out)["version"], json.loads(out)["rollback_floor"]) == (0, 2, 2)
    code, out, _ = run(capsys, "release", "sign", repo, "--key", key, "--version", "5", "--json")
    assert (code, json.loads(out)["version"], json.loads(out)["rollback_floor"]) == (0, 5, 2)
    code, _, err = run(capsys, "release", "sign", repo, "--key", key, "--version", "5")
    assert "not above the previous" in one_line_failure(code, err)
    code, _, err = run(capsys, "release", "sign", repo, "--key", key, "--floor", "9")
    assert "rollback floor" in one_line_failure(code, err)
    assert run(capsys, "release", "verify", repo, "--trust", pub, "--floor", "5")[0] == 0
    code, out, err = run(capsys, "release", "verify", repo, "--trust", pub, "--floor", "6", "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "RollbackError"


def test_expired_release_fails_verify(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    signing_key = load_signing_key(keys["alice"][0])
    sign_release(repo, [signing_key], expires=timedelta(hours=1), now=datetime.now(UTC) - timedelta(days=1))
    code, out, err = run(capsys, "release", "verify", repo, "--trust", keys["alice"][1], "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "ExpiredError"


def test_bad_duration_and_missing_manifest(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    code, _, err = run(capsys, "release", "sign", repo, "--key", keys["alice"][0], "--expires", "3 days")
    assert "duration" in one_line_failure(code, err)
    assert not (repo / MANIFEST_PATH).exists()
    code, _, err = run(capsys, "release", "verify", repo, "--trust", keys["alice"][1])
    assert "no signed manifest" in one_line_failure(code, err)


def test_parse_duration_forms() -> None:
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("1d12h") == timedelta(hours=36)  # the same parser as every other duration
    for bad in ("0d", "1y", "-1d", "d", "12h1d", "99999w"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_oversized_manifest_is_refused(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    (repo / ".fleet").mkdir()
    with (repo / MANIFEST_PATH).open("wb") as fh:
        fh.truncate(8 * 1024 * 1024 + 1)
    code, out, err = run(capsys, "release", "verify", repo, "--trust", keys["alice"][1], "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "ManifestTooLarge"


# --- collecting files ------------------------------------------------------------------------------

def test_collect_uses_git_file_list_in_a_work_tree(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "config")
    (repo / "debug.log").write_text("ignored\n")
    (repo / "bundles" / "new.yaml").write_text("untracked but not ignored\n")
    (repo / "bundles" / "web" / "nginx.conf").unlink()
    files = collect_release_files(repo)
    assert set(files) == {".gitignore", "fleet.yaml", "bundles/web/bundle.yaml", "bundles/new.yaml"}
    assert files["bundles/new.yaml"] == b"untracked but not ignored\n"


def test_sign_and_verify_in_a_git_work_tree(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "config")
    assert run(capsys, "release", "sign", repo, "--key", keys["alice"][0])[0] == 0
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "release 1")
    assert run(capsys, "release", "verify", repo, "--trust", keys["alice"][1])[0] == 0
    listed = subprocess.run(["git", "-C", str(repo), "ls-files"], check=True, capture_output=True,
                            text=True, timeout=60).stdout.split()
    assert MANIFEST_PATH in listed


def test_symlinks_are_refused(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                              capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    os.symlink("/etc/hostname", repo / "bundles" / "link")
    code, _, err = run(capsys, "release", "sign", repo, "--key", keys["alice"][0])
    assert "symlink" in one_line_failure(code, err)
    (repo / "bundles" / "link").unlink()
    os.symlink(repo / "bundles" / "web", repo / "bundles" / "dirlink")
    with pytest.raises(UsageError, match="symlink"):
        collect_release_files(repo)


# --- root rotation ---------------------------------------------------------------------------------

def test_root_rotation_end_to_end(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    (alice, alice_pub), (bob, bob_pub), (carol, carol_pub) = keys["alice"], keys["bob"], keys["carol"]
    code, out, _ = run(capsys, "keys", "rotate", repo, "--trust", alice_pub, "--threshold", "1",
                       "--key", alice, "--json")
    assert (code, json.loads(out)["version"]) == (0, 1)
    assert (repo / ".fleet" / "root" / "1.json").is_file()

    # Signed only by the new keys: refused, nothing written.
    code, _, err = run(capsys, "keys", "rotate", repo, "--trust", bob_pub, "--trust", carol_pub,
                       "--threshold", "2", "--key", bob, "--key", carol)
    assert "current keys" in one_line_failure(code, err)
    assert not (repo / ".fleet" / "root" / "2.json").exists()

    code, out, _ = run(capsys, "keys", "rotate", repo, "--trust", bob_pub, "--trust", carol_pub,
                       "--threshold", "2", "--key", alice, "--key", bob, "--key", carol, "--json")
    assert (code, json.loads(out)["version"]) == (0, 2)

    # Devices configured with alice (root version 1) follow the chain to bob + carol.
    assert run(capsys, "release", "sign", repo, "--key", alice)[0] == 0
    code, out, err = run(capsys, "release", "verify", repo, "--trust", alice_pub, "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "UntrustedKeyError"
    assert run(capsys, "release", "sign", repo, "--key", bob, "--key", carol)[0] == 0
    code, out, _ = run(capsys, "release", "verify", repo, "--trust", alice_pub, "--json")
    assert code == 0
    assert json.loads(out)["trust_root_version"] == 2

    # A forged third root (signed by alice, no longer trusted) breaks the chain.
    (repo / ".fleet" / "root" / "3.json").write_bytes((repo / ".fleet" / "root" / "1.json").read_bytes())
    code, out, err = run(capsys, "release", "verify", repo, "--trust", alice_pub, "--json")
    one_line_failure(code, err)
    assert json.loads(out)["error"] == "RootRotationError"


def test_genesis_root_must_be_signed_by_its_keys(tmp_path: Path, keys: dict[str, tuple[Path, str]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo(tmp_path)
    code, _, err = run(capsys, "keys", "rotate", repo, "--trust", keys["bob"][1], "--threshold", "1",
                       "--key", keys["alice"][0])
    one_line_failure(code, err)
    assert not (repo / ".fleet" / "root").exists()


# --- the installed console script ------------------------------------------------------------------

def test_console_script_exit_codes_and_one_line_errors(tmp_path: Path,
                                                       keys: dict[str, tuple[Path, str]]) -> None:
    script = Path(sys.executable).parent / "fleetctl"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    repo = make_repo(tmp_path)

    def fleetctl(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=60, check=False)

    ok = fleetctl("release", "sign", repo, "--key", keys["alice"][0], "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["version"] == 1
    assert fleetctl("release", "verify", repo, "--trust", keys["alice"][1]).returncode == 0
    (repo / "fleet.yaml").write_text("tampered\n")
    bad = fleetctl("release", "verify", repo, "--trust", keys["alice"][1])
    assert bad.returncode == 1
    assert bad.stderr == "fleetctl: fleet.yaml does not match its digest or size in release 1\n"
    assert fleetctl("release", "--help").returncode == 0
    usage = fleetctl("release", "sign", repo)
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr
