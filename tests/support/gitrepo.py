"""Real Git repositories for tests, built with the `git` command line.

    work = WorkRepo.create(tmp_path / "work")
    work.write("bundles/base/bundle.yaml", "name: base\n")
    sha = work.commit("first")
    mirror = make_bare(tmp_path / "mirrors" / "fleet.git")
    work.push(mirror)

Every helper runs `git` with a fixed argv and a fixed identity, so it does not depend on the
developer's configuration (tests/conftest.py scrubs HOME and GIT_* as well).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BRANCH",
    "WorkRepo",
    "allow_any_sha_in_want",
    "git",
    "make_bare",
    "rev_parse",
]

DEFAULT_BRANCH = "main"

_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test Operator",
    "GIT_AUTHOR_EMAIL": "operator@example.invalid",
    "GIT_COMMITTER_NAME": "Test Operator",
    "GIT_COMMITTER_EMAIL": "operator@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args: str, cwd: Path | None = None, input_bytes: bytes | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run ``git ARGS`` and return its stdout as text; raise CalledProcessError with stderr on failure."""
    full_env = dict(os.environ)
    full_env.update(_IDENTITY)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        ["git", *args], cwd=cwd, input=input_bytes, capture_output=True, env=full_env,
        timeout=120, check=False,
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode, proc.args, proc.stdout, proc.stderr,
        )
    return proc.stdout.decode("utf-8", "replace")


def allow_any_sha_in_want(bare: Path) -> None:
    """Let clients fetch any object by sha from this repository (what the fleet's mirrors set)."""
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    git("config", "uploadpack.allowReachableSHA1InWant", "true", cwd=bare)


def make_bare(path: Path, *, allow_sha_wants: bool = True) -> Path:
    """Create an empty bare repository at ``path`` (parents included) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    git("init", "--quiet", "--bare", f"--initial-branch={DEFAULT_BRANCH}", str(path))
    if allow_sha_wants:
        allow_any_sha_in_want(path)
    return path


def rev_parse(repo: Path, rev: str) -> str:
    """Return the full hex sha that ``rev`` names in ``repo``."""
    return git("rev-parse", "--verify", rev + "^{commit}", cwd=repo).strip()


@dataclass
class WorkRepo:
    """A working repository: write files, commit, push to a bare mirror."""

    path: Path
    branch: str = DEFAULT_BRANCH

    @classmethod
    def create(cls, path: Path, branch: str = DEFAULT_BRANCH) -> WorkRepo:
        """Initialise a new working repository at ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        git("init", "--quiet", f"--initial-branch={branch}", str(path))
        git("config", "commit.gpgsign", "false", cwd=path)
        return cls(path, branch)

    def write(self, rel: str, content: str | bytes, *, mode: int | None = None) -> Path:
        """Write ``content`` to ``rel`` (parents created) and return the absolute path."""
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            target.write_bytes(content)
        if mode is not None:
            target.chmod(mode)
        return target

    def write_files(self, files: Mapping[str, str | bytes]) -> None:
        """Write every ``rel -> content`` pair of ``files``."""
        for rel, content in files.items():
            self.write(rel, content)

    def symlink(self, rel: str, target: str) -> Path:
        """Create a symbolic link ``rel`` pointing at ``target``."""
        link = self.path / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        return link

    def remove(self, rel: str) -> None:
        """Delete the file ``rel`` from the working tree."""
        (self.path / rel).unlink()

    def commit(self, message: str = "change", *, allow_empty: bool = False) -> str:
        """Stage everything, commit, and return the new commit's sha."""
        git("add", "--all", cwd=self.path)
        args = ["commit", "--quiet", "--no-verify", "-m", message]
        if allow_empty:
            args.append("--allow-empty")
        git(*args, cwd=self.path)
        return self.head()

    def head(self) -> str:
        """Return the sha of HEAD."""
        return rev_parse(self.path, "HEAD")

    def push(self, bare: Path, *, force: bool = False) -> None:
        """Push the branch to the bare repository ``bare``."""
        args = ["push", "--quiet"]
        if force:
            args.append("--force")
        git(*args, str(bare), f"{self.branch}:refs/heads/{self.branch}", cwd=self.path)

    def commit_and_push(self, bare: Path, files: dict[str, str | bytes], message: str = "change") -> str:
        """Write ``files``, commit them, push to ``bare`` and return the commit sha."""
        self.write_files(files)
        sha = self.commit(message)
        self.push(bare)
        return sha
