"""The operator's side of the demo: keys, the config repository, lint, sign, commit and push.

The example config repository (``examples/config-repo``) is copied as it is, with two changes for a
fleet that lives on one machine for two minutes: the gateway application's port is a stand-in
listener's free port, and the rollout plan's soaks and timeouts are seconds instead of hours.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from demo.procs import BIN, DemoError, run_tool

__all__ = ["DEMO_PLAN", "ConfigRepo", "generate_keys"]

DEMO_PLAN = """\
description: Canary devices first, then a quarter of the fleet, then everyone (demo timing).
rollback_on_failure: true
waves:
  - name: canary
    selector:
      labels: {canary: "true"}
    soak: 4s
    max_failures: 0
    timeout: 60s
  - name: quarter
    percent: 25
    soak: 2s
    max_failure_rate: 0.05
    timeout: 60s
  - name: everyone
    percent: 100
    pause_before: true
    soak: 0s
    max_failure_rate: 0.02
    timeout: 60s
"""


def generate_keys(directory: Path, names: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Generate one Ed25519 signing key per operator with ``fleetctl keys generate``; return the key
    files and their public keys.

    Raises:
        DemoError: fleetctl failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{name}.key" for name in names]
    public = [run_tool([BIN / "fleetctl", "keys", "generate", "--out", f]).stdout.strip() for f in files]
    return files, public


class ConfigRepo:
    """The operator's work tree of the config repository, pushing to the bare mirror ``bare``."""

    def __init__(self, path: Path, bare: Path, keys: Sequence[Path]) -> None:
        self.path = path
        self.bare = bare
        self.keys = list(keys)

    def create(self, example: Path, app_port: int) -> None:
        """Copy ``example`` into the work tree, adapt it to the demo, and make it a Git repository
        whose ``origin`` is the (new, empty) bare mirror.

        Raises:
            DemoError: git failed.
        """
        shutil.copytree(example, self.path)
        app = self.path / "bundles/gateway-app/bundle.yaml"
        app.write_text(app.read_text().replace("8443", str(app_port)))
        (self.path / "rollouts/default.yaml").write_text(DEMO_PLAN)
        run_tool(["git", "init", "-q", "--bare", "-b", "main", self.bare])
        run_tool(["git", "init", "-q", "-b", "main"], cwd=self.path)
        run_tool(["git", "remote", "add", "origin", self.bare], cwd=self.path)

    def lint(self) -> str:
        """Run ``fleetctl lint``; return its summary line.

        Raises:
            DemoError: the repository has errors.
        """
        return run_tool([BIN / "fleetctl", "lint", self.path]).stdout.strip().splitlines()[-1]

    def sign(self, message: str) -> str:
        """Sign the work tree as the next release with every operator key; return fleetctl's summary.

        Raises:
            DemoError: signing failed.
        """
        args: list[str | Path] = [BIN / "fleetctl", "release", "sign", self.path, "--message", message]
        for key in self.keys:
            args += ["--key", key]
        return run_tool(args).stdout.strip()

    def commit_and_push(self, message: str) -> str:
        """Commit everything and push ``main`` to the mirror; return the commit id.

        Raises:
            DemoError: git failed.
        """
        run_tool(["git", "add", "-A"], cwd=self.path)
        run_tool(["git", "commit", "-q", "-m", message], cwd=self.path)
        run_tool(["git", "push", "-q", "origin", "main"], cwd=self.path)
        return run_tool(["git", "rev-parse", "HEAD"], cwd=self.path).stdout.strip()

    def edit(self, relative: str, old: str, new: str) -> None:
        """Replace ``old`` with ``new`` in one file of the work tree (``old`` must be there).

        Raises:
            DemoError: ``old`` is not in the file.
        """
        path = self.path / relative
        text = path.read_text()
        if old not in text:
            raise DemoError(f"{relative} does not contain {old!r}")
        path.write_text(text.replace(old, new))
