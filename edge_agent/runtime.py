"""The runtime of one agent operation: source, state, runner, clock and driver context, built once.

The CLI and the daemon build a :class:`Runtime` from ``agent.yaml`` with :func:`open_runtime` and
pass it to the pipeline (:mod:`edge_agent.sync`); every step receives it and none builds its own.
The mirror and the clock sit behind small protocols (:class:`ReleaseSource`, :class:`Clock`), so a
test can run a whole sync from an in-memory source with a frozen clock and no git daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge_agent.config import AgentConfig
from edge_agent.drivers.base import Context
from edge_agent.errors import LockedError
from edge_agent.fsafe import FsRoot
from edge_agent.prefetch import open_source
from edge_agent.runner import CommandEnv, Runner
from edge_agent.state import StateDB
from edge_core.errors import StateError
from edge_core.profiles import DeviceProfile, load_profile

if TYPE_CHECKING:
    from edge_core.resources import SecretFile
    from edge_core.trust.keys import PrivateKey

__all__ = [
    "BACKUP_DIR",
    "DIGEST_KEY_FILE",
    "LOCK_FILE",
    "SECRET_SUFFIX",
    "STATE_DB",
    "Clock",
    "Fetched",
    "ReleaseSource",
    "Runtime",
    "apply_lock",
    "open_runtime",
    "open_state",
    "system_clock",
    "with_payloads",
]

STATE_DB = "state.db"
LOCK_FILE = "apply.lock"
BACKUP_DIR = "backups"
DIGEST_KEY_FILE = "digest.key"
SECRET_SUFFIX = ".sealed.json"  # noqa: S105 - a file name suffix, not a secret


class Fetched(Protocol):
    """What a fetch returns: the commit now readable from the source."""

    @property
    def commit(self) -> str:
        """The hex sha of the fetched revision."""
        ...


class ReleaseSource(Protocol):
    """Where releases come from: the Git mirror's cache (:class:`edge_core.source.Source`) or a test's."""

    def fetch(self, want: str | None = None) -> Fetched:
        """Make ``want`` (None: the branch head) readable; raise FetchError when it cannot."""
        ...

    def read_tree(self, commit: str) -> Mapping[str, bytes]:
        """Return every file of ``commit``'s tree, path -> bytes."""
        ...

    def commit_raw(self, commit: str) -> bytes:
        """Return the raw commit object (for SSH commit signatures)."""
        ...

    def clear_stale_locks(self) -> list[str]:
        """Remove lock files a killed fetch left; return their names."""
        ...

    def close(self) -> None:
        """Release what the source holds open."""
        ...


class Clock(Protocol):
    """The time of the device, as an aware UTC datetime."""

    def __call__(self) -> datetime:
        """Return the current time."""
        ...


def system_clock() -> datetime:
    """Return the system time in UTC."""
    return datetime.now(UTC)


@dataclass
class Runtime:
    """Everything one operation needs, built once and closed once."""

    config: AgentConfig
    state: StateDB
    profile: DeviceProfile
    ctx: Context
    runner: Runner
    source: ReleaseSource
    clock: Clock = field(default=system_clock)

    def close(self) -> None:
        """Release the state database, the device root and the source."""
        try:
            self.state.close()
        finally:
            try:
                self.ctx.fs.close()
            finally:
                self.source.close()


@contextlib.contextmanager
def apply_lock(state_dir: Path) -> Iterator[None]:
    """Hold the exclusive apply lock of ``state_dir`` for the block.

    Raises:
        LockedError: another process (or thread) holds it.
        StateError: the lock file cannot be created.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open the apply lock in {state_dir}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(f"another apply holds {state_dir / LOCK_FILE}") from exc
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def open_state(config: AgentConfig) -> StateDB:
    """Open (creating it and ``state_dir``, 0700) the device's state database.

    Raises:
        StateError: the database cannot be opened.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return StateDB(config.state_dir / STATE_DB)


def _digest_key(state_dir: Path) -> bytes:
    """Return the device-local HMAC key for secret digests, creating it (0600) on first use."""
    path = state_dir / DIGEST_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(key) != 32:
        raise StateError(f"{path} is corrupt; remove it to start over")
    return key


def _secret_opener(state_dir: Path) -> Callable[[SecretFile, bytes], bytes]:
    """Return a function opening a sealed document for a secret_file with this device's key.

    The expected secret id is the sealed file's name without ``.sealed.json``
    (``secrets/wifi-psk.sealed.json`` -> ``wifi-psk``), so a sealed file cannot be moved to another
    name. The device key and the sealed-box code are loaded on first use only.
    """
    cache: list[PrivateKey] = []

    def opener(res: SecretFile, document: bytes) -> bytes:
        from edge_agent.identity import load_encryption_private  # noqa: PLC0415 - secrets only
        from edge_core.trust.sealed import open_sealed  # noqa: PLC0415 - secrets only

        if not cache:
            cache.append(load_encryption_private(state_dir))
        name = res.secret.rsplit("/", 1)[-1]
        return open_sealed(document, expected_id=name.removesuffix(SECRET_SUFFIX), key=cache[0])

    return opener


def open_runtime(config: AgentConfig, *, source: ReleaseSource | None = None,
                 clock: Clock = system_clock, diffs: bool = False) -> Runtime:
    """Build the runtime of one operation from ``config`` (``source``: the mirror's cache by default).

    ``diffs``: whether its plans carry content diffs; only a plan that is shown needs them
    (``edge-agent plan``), see :class:`~edge_agent.drivers.base.Context`.

    Raises:
        ConfigError: the device profile or the repo section cannot be used.
        StateError: the state directory or database cannot be used.
    """
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    profile = load_profile(config.profile, list(config.profile_dirs))
    backups = state_dir / BACKUP_DIR
    backups.mkdir(exist_ok=True, mode=0o700)
    key = _digest_key(state_dir)
    src: ReleaseSource = source if source is not None else open_source(config)
    fs = FsRoot(config.root, profile.allowed_roots, denied_roots=profile.denied_roots, blob_key=key)
    try:
        state = StateDB(state_dir / STATE_DB)
    except BaseException:
        fs.close()
        src.close()
        raise
    runner = Runner()
    ctx = Context(
        fs=fs, runner=runner, payloads={}, open_secret=_secret_opener(state_dir), backup_store=backups,
        secret_digest=lambda data: hmac.new(key, data, hashlib.sha256).hexdigest(),
        command_env=CommandEnv(device=config.device_id), diffs=diffs,
    )
    return Runtime(config=config, state=state, profile=profile, ctx=ctx, runner=runner, source=src,
                   clock=clock)


def with_payloads(ctx: Context, payloads: Mapping[str, bytes], version: int, commit: str) -> Context:
    """Return ``ctx`` carrying a release's payloads and its release/commit in the command environment."""
    who = replace(ctx.command_env, release=version, commit=commit)
    return replace(ctx, payloads=payloads, command_env=who)
