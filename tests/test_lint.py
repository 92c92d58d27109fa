"""fleet_server.lint and `fleetctl lint`: the example is clean, planted problems are all found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleet_server.fleetctl import main
from fleet_server.lint import LintProblem, lint_repo

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "device_profiles"
EXAMPLE = ROOT / "examples" / "config-repo"

BROKEN_BUNDLE = """\
targets:
  - profiles: [gateway]
resources:
  - kind: file
    path: /etc/passwd
    content: "x"
  - kind: command
    name: x
    run: [/bin/true]
  - kind: file
    path: /etc/edge-gateway/a.conf
    source: files/missing.conf
  - kind: file
    path: /etc/edge-gateway/b.conf
    source: files/link.conf
  - kind: packages
    name: x
  - kind: systemd_unit
    name: b.service
    running: true
    watch: [file:/etc/nope]
  - kind: secret_file
    path: /etc/edge-gateway/token
    secret: secrets/missing.sealed.json
  - kind: secret_file
    path: /etc/edge-gateway/token2
    secret: secrets/plain.json
  - kind: file
    path: /etc/edge-gateway/key.pem
    content: |
      -----BEGIN PRIVATE KEY-----
      MIIEvQIBADANBgkqhkiG9w0BAQEFAASC
      -----END PRIVATE KEY-----
  - kind: file
    path: /etc/edge-gateway/a.conf
    content: dup
  - kind: file
    path: /etc/edge-gateway/t.conf
    template: true
    content: "port=${port} ${nope}"
  - kind: file
    path: /etc/edge-gateway/ok.conf
    content: "password: hunter2-but-fine  # lint: allow-secret"
health:
  - kind: ping
values:
  port: "80"
  db_password: hunter22
overlays:
  - match: {labels: {site: x}}
    files: {files/missing.conf: files/also-missing.conf}
colour: red
"""

APP_ENV = """\
API_KEY=abcd1234efgh
TOKEN=${TOKEN}
password = s3cret-value # lint: allow-secret
aws = AKIAABCDEFGHIJKLMNOP
db_password: changeme
gh = ghp_0123456789abcdefghijABCDEFGHIJ0123456789
"""

# (file, line, fragment of the reason, severity)
EXPECTED = [
    ("fleet.yaml", 3, "not a duration", "error"),
    ("rollouts/list.yaml", 1, "must be a mapping", "error"),
    ("rollouts/syntax.yaml", 3, "syntax error", "error"),
    ("bundles/empty", 1, "has no bundle.yaml", "error"),
    ("bundles/broken/bundle.yaml", 4, "/etc/passwd is outside the allowed roots of device profile 'gateway'",
     "error"),
    ("bundles/broken/bundle.yaml", 7, "kind 'command' is not allowed by device profile 'gateway'", "error"),
    ("bundles/broken/bundle.yaml", 12, "files/missing.conf does not exist", "error"),
    ("bundles/broken/bundle.yaml", 15, "leads outside the bundle directory", "error"),
    ("bundles/broken/bundle.yaml", 16, "unknown resource kind 'packages'", "error"),
    ("bundles/broken/bundle.yaml", 18, "systemd unit 'b.service' is not allowed by device profile 'gateway'",
     "error"),
    ("bundles/broken/bundle.yaml", 21, "watch names unknown resource id 'file:/etc/nope'", "error"),
    ("bundles/broken/bundle.yaml", 24, "secrets/missing.sealed.json cannot be read: No such file", "error"),
    ("bundles/broken/bundle.yaml", 27, "secrets/plain.json is not a sealed secret", "error"),
    ("bundles/broken/bundle.yaml", 31, "a PEM private key block", "error"),
    ("bundles/broken/bundle.yaml", 34, "duplicate resource id 'file:/etc/edge-gateway/a.conf'", "error"),
    ("bundles/broken/bundle.yaml", 37, "unknown value ${nope}", "error"),
    ("bundles/broken/bundle.yaml", 45, "unknown health check kind 'ping'", "error"),
    ("bundles/broken/bundle.yaml", 48, "value 'db_password' contains a literal db_password assignment",
     "error"),
    ("bundles/broken/bundle.yaml", 51, "files/also-missing.conf does not exist", "error"),
    ("bundles/broken/bundle.yaml", 52, "unknown top-level key 'colour'", "error"),
    ("bundles/broken/files/app.env", 1, "a literal API_KEY assignment", "error"),
    ("bundles/broken/files/app.env", 4, "an AWS access key id", "error"),
    ("bundles/broken/files/app.env", 6, "a GitHub token", "error"),
    ("bundles/stray/bundle.yaml", 5, "no known device profile allows it", "error"),
    ("bundles/stray/bundle.yaml", 2, "no known device profile named 'kiosk'", "warning"),
    ("bundles/untargeted/bundle.yaml", 1, "applies to no device", "warning"),
    ("bundles/motd/bundle.yaml", 8, "mode must be an octal string", "error"),
    ("bundles/tools/bundle.yaml", 8, "also declared in bundles/gateway-app/bundle.yaml", "warning"),
]


def broken_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "fleet.yaml").write_text("description: x\nreconcile:\n  poll_interval: soon\n")
    (repo / "rollouts" / "list.yaml").write_text("- wave: 1\n")
    (repo / "rollouts" / "syntax.yaml").write_text("waves:\n  - a: 1\n   b: 2\n")
    (repo / "bundles" / "empty").mkdir()
    (repo / "bundles" / "empty" / "README").write_text("forgot the bundle.yaml\n")
    broken = repo / "bundles" / "broken"
    (broken / "files").mkdir(parents=True)
    (broken / "bundle.yaml").write_text(BROKEN_BUNDLE)
    (broken / "files" / "app.env").write_text(APP_ENV)
    (tmp_path / "outside.conf").write_text("outside\n")
    (broken / "files" / "link.conf").symlink_to(tmp_path / "outside.conf")
    (repo / "secrets").mkdir(exist_ok=True)
    (repo / "secrets" / "plain.json").write_text(json.dumps({"type": "plaintext", "value": "x"}))
    (repo / "bundles" / "stray").mkdir()
    (repo / "bundles" / "stray" / "bundle.yaml").write_text(
        "targets:\n  - profiles: [kiosk]\n  - labels: {role: x}\nresources:\n  - kind: file\n"
        "    path: /root/.bashrc\n    content: \"alias ll='ls -l'\\n\"\n"
    )
    (repo / "bundles" / "untargeted").mkdir()
    (repo / "bundles" / "untargeted" / "bundle.yaml").write_text(
        "description: nothing yet\nresources:\n  - {kind: directory, path: /opt/gateway/x}\n"
    )
    motd = repo / "bundles" / "motd" / "bundle.yaml"
    motd.write_text(motd.read_text().replace('mode: "0644"', 'mode: "rw-r--r--"'))
    tools = repo / "bundles" / "tools" / "bundle.yaml"
    tools.write_text(tools.read_text().replace(
        "  - kind: command", "  - kind: directory\n    path: /opt/gateway/data\n  - kind: command", 1))
    return repo


def test_example_repo_is_clean() -> None:
    assert lint_repo(EXAMPLE, [SHIPPED]) == []


def test_example_repo_cli_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lint", str(EXAMPLE), "--profiles", str(SHIPPED)]) == 0
    assert main(["lint", str(EXAMPLE)]) == 0  # default: the checkout's device_profiles/
    out = capsys.readouterr().out
    assert out.count("0 error(s), 0 warning(s)") == 2


def test_every_planted_problem_is_reported(tmp_path: Path) -> None:
    problems = lint_repo(broken_repo(tmp_path), [SHIPPED])
    missing = [e for e in EXPECTED if not any(
        (p.file, p.line, p.severity) == (e[0], e[1], e[3]) and e[2] in p.reason for p in problems)]
    assert missing == [], "\n".join(f"{p.file}:{p.line}: {p.severity}: {p.reason}" for p in problems)
    unexpected = [p for p in problems if not any(
        (p.file, p.line, p.severity) == (e[0], e[1], e[3]) and e[2] in p.reason for e in EXPECTED)]
    assert unexpected == []
    assert problems == sorted(problems)
    assert all(isinstance(p, LintProblem) for p in problems)


def test_cli_reports_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = broken_repo(tmp_path)
    assert main(["lint", str(repo), "--profiles", str(SHIPPED)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "fleet.yaml:3: error: 'soon' is not a duration like 30s, 5m, 1h or whole seconds" in lines
    assert lines[-1].endswith(f"{len(EXPECTED) - 3} error(s), 3 warning(s)")
    body = lines[:-1]
    keys = [(ln.split(":")[0], int(ln.split(":")[1])) for ln in body]
    assert keys == sorted(keys)


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = broken_repo(tmp_path)
    assert main(["lint", str(repo), "--profiles", str(SHIPPED), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["errors"] == len(EXPECTED) - 3
    assert doc["warnings"] == 3
    assert {"file": "rollouts/list.yaml", "line": 1, "reason": "a rollout plan must be a mapping",
            "severity": "error"} in doc["problems"]


def test_warnings_alone_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    (repo / "bundles" / "later").mkdir(parents=True)
    (repo / "bundles" / "later" / "bundle.yaml").write_text("description: not targeted yet\n")
    assert main(["lint", str(repo), "--profiles", str(SHIPPED)]) == 0
    assert "bundles/later/bundle.yaml:1: warning:" in capsys.readouterr().out


def test_sealed_secret_file_accepted(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "secrets").mkdir(exist_ok=True)
    (repo / "secrets" / "token.sealed.json").write_text(
        json.dumps({"type": "edge-fleet/sealed-secret", "version": 1, "recipients": [], "ciphertext": "AA"}))
    motd = repo / "bundles" / "motd" / "bundle.yaml"
    motd.write_text(motd.read_text() + "  - kind: secret_file\n    path: /etc/edge-gateway/token\n"
                                       "    secret: secrets/token.sealed.json\n")
    assert lint_repo(repo, [SHIPPED]) == []


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lint", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["lint"])
    assert info.value.code == 2


def test_invalid_profile_dir_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "bad.yaml").write_text("name: bad\n")
    assert main(["lint", str(EXAMPLE), "--profiles", str(tmp_path / "p")]) == 1
    assert "bad" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ("password=hunter22", True),
        ("DB_PASSWORD: 'correct horse'", True),
        ("client_secret = s3cr3tvalue", True),
        ("api-key: 0123abcd", True),
        ('"token": "abcdef123456",', True),
        ("password: ${DB_PASSWORD}", False),
        ("password = {{ vault_pw }}", False),
        ("token: <your token here>", False),
        ("password: changeme", False),
        ("password: null", False),
        ("password_file: /run/secrets/pw", False),
        ("token = os.environ['TOKEN']", False),
        ("max_tokens: 4096", False),
        ("secret_file: secrets/a.sealed.json", False),
        ("password: ****", False),
        ("pw: abc", False),
        ("password=hunter22 # lint: allow-secret", False),
        ("-----BEGIN RSA PRIVATE KEY-----", True),
        ("-----BEGIN CERTIFICATE-----", False),
        ("-----BEGIN PUBLIC KEY-----", False),
        ("id = AKIAIOSFODNN7EXAMPLE", True),
        ("id = XAKIAIOSFODNN7EXAMPLE", False),
    ],
)
def test_secret_heuristics(tmp_path: Path, line: str, flagged: bool) -> None:
    repo = tmp_path / "repo"
    (repo / "bundles" / "b" / "files").mkdir(parents=True)
    (repo / "bundles" / "b" / "bundle.yaml").write_text(
        "targets: [{all: true}]\nresources:\n  - {kind: file, path: /srv/x, source: files/x}\n")
    (repo / "bundles" / "b" / "files" / "x").write_text(f"# header\n{line}\n")
    problems = lint_repo(repo, [SHIPPED])
    assert [(p.file, p.line) for p in problems] == ([("bundles/b/files/x", 2)] if flagged else [])
