"""Opt-in SSH-signed commits: with `trust.allowed_signers` the agent applies only commits signed
(real `git commit -S`, `gpg.format=ssh`, keys from the real `ssh-keygen`) by an allowed key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from edge_agent.agent import sync_once
from edge_agent.config import load_config
from tests.support.agent_fleet import AgentFleet, base_release
from tests.support.gitrepo import git


def ssh_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_name(path.name + ".pub")


def sign_commits_with(fleet: AgentFleet, public_key: Path | None) -> None:
    if public_key is None:
        git("config", "commit.gpgsign", "false", cwd=fleet.work.path)
        return
    git("config", "gpg.format", "ssh", cwd=fleet.work.path)
    git("config", "user.signingkey", str(public_key), cwd=fleet.work.path)
    git("config", "commit.gpgsign", "true", cwd=fleet.work.path)


def require_signers(fleet: AgentFleet, allowed: Path) -> None:
    data = yaml.safe_load(fleet.config_path.read_text())
    data["trust"]["allowed_signers"] = str(allowed)
    fleet.config_path.write_text(yaml.safe_dump(data))
    fleet.config = load_config(fleet.config_path)


def test_only_commits_signed_by_an_allowed_key_are_applied(fleet: AgentFleet, tmp_path: Path) -> None:
    alice = ssh_key(tmp_path / "alice")
    mallory = ssh_key(tmp_path / "mallory")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'alice@example.invalid namespaces="git" {alice.read_text().strip()}\n')
    require_signers(fleet, allowed)

    sign_commits_with(fleet, alice)
    first = fleet.publish(base_release(fleet.root))
    result = sync_once(fleet.config)
    assert (result.outcome, result.commit) == ("applied", first)
    applied = (fleet.root / "etc/motd").read_bytes()

    # Signed release manifest, but the commit is signed by a key that is not allowed.
    sign_commits_with(fleet, mallory)
    fleet.publish({"bundles/app/files/app.conf": "listen = 1\n"})
    refused = sync_once(fleet.config)
    assert refused.outcome == "refused"
    assert "allowed" in (refused.reason or "") or "signer" in (refused.reason or "")

    # An unsigned commit is refused too; the device keeps the first release.
    sign_commits_with(fleet, None)
    fleet.publish({"bundles/app/files/app.conf": "listen = 2\n"})
    unsigned = sync_once(fleet.config)
    assert unsigned.outcome == "refused"
    assert (fleet.root / "etc/motd").read_bytes() == applied
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 8443\nupstream = one\n"

    sign_commits_with(fleet, alice)
    last = fleet.publish({"bundles/app/files/app.conf": "listen = 3\n"})
    assert (sync_once(fleet.config).outcome, (fleet.root / "etc/app/app.conf").read_text()) == \
        ("applied", "listen = 3\n")
    assert last != first
