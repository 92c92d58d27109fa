"""The repository cache's side of a sync: build the :class:`Source` from ``agent.yaml`` and fetch a
revision into the cache without the apply lock.

A fetch from a slow or hostile mirror may take up to ``repo.fetch_deadline``. The daemon fetches
first, holding only the cache's fetch lock (``state_dir/repo/fetch.lock``, taken by every fetch),
and takes the apply lock afterwards to verify, plan and apply from the cache, so drift checks and
health reports keep running while a fetch waits on the network. The stale-lock cleaner of the
cache takes the same fetch lock, so its premise (no other process is using the cache) stays true.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_core.errors import ConfigError, FetchError
from edge_core.source import FetchResult, Source, SourceAuth

__all__ = ["REPO_CACHE", "Prefetched", "open_source", "prefetch", "read_secret_file"]

REPO_CACHE = "repo"


def read_secret_file(path: Path | None, key: str) -> str | None:
    """Return the stripped text of the credential file configured as ``key`` (None for no file).

    Raises:
        ConfigError: the file cannot be read or is not UTF-8 text (a setup problem, not a fetch
            failure to retry).
    """
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from exc


def open_source(config: AgentConfig) -> Source:
    """Return the :class:`Source` of ``config.repo`` with its cache in ``state_dir/repo``.

    Raises:
        ConfigError: the repo section cannot be used (e.g. an ssh mirror without known hosts, or
            an unreadable credential file).
    """
    repo, auth = config.repo, config.repo.auth
    token = read_secret_file(auth.token_file, "repo.auth.token_file")
    password = read_secret_file(auth.password_file, "repo.auth.password_file")
    try:
        return Source(
            repo.url, repo.branch, config.state_dir / REPO_CACHE,
            max_bytes=repo.max_fetch_bytes, depth=1, timeout=repo.timeout, limits=repo.fetch_limits,
            auth=SourceAuth(token=token, username=auth.username, password=password, ssh_key=auth.ssh_key,
                            ssh_known_hosts=auth.ssh_known_hosts),
        )
    except ValueError as exc:
        raise ConfigError(f"repo: {exc}") from exc


@dataclass(frozen=True)
class Prefetched:
    """The outcome of fetching ``want`` (None: the branch head) into the cache ahead of a sync."""

    want: str | None
    result: FetchResult | None = None
    error: FetchError | None = None

    def get(self) -> FetchResult:
        """Return the fetch result.

        Raises:
            FetchError: the fetch failed (the same error, raised again).
        """
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def prefetch(config: AgentConfig, want: str | None) -> Prefetched:
    """Fetch ``want`` (or the branch head) into the repository cache, holding only its fetch lock.

    Lock files a killed fetch left are cleared first (under the fetch lock). Never raises for a
    fetch failure: it is returned, for the sync to record as ``fetch_failed``.

    Raises:
        ConfigError: the repo section cannot be used.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        source = open_source(config)
    except FetchError as exc:
        return Prefetched(want, error=exc)
    try:
        source.clear_stale_locks()
        return Prefetched(want, result=source.fetch(want))
    except FetchError as exc:
        return Prefetched(want, error=exc)
    finally:
        source.close()
