"""A real OpenSSH server on loopback for tests of ``ssh://`` mirrors.

``Sshd`` runs ``/usr/sbin/sshd -D -e -f <generated sshd_config>`` on 127.0.0.1 and a free port, as
the current user, with its own ed25519 host key, its own authorized_keys file, public-key login
only (no passwords, no PAM), and its pid file in the server's directory. It is stopped by the pid
it was started with, never by name.

    with Sshd(tmp_path / "sshd") as server:
        key = make_ssh_key(tmp_path / "client_key")
        server.authorize(key.with_suffix(".pub"))
        server.write_known_hosts(tmp_path / "known_hosts")
        Source(server.url(bare_repo), "main", cache,
               auth=SourceAuth(ssh_key=key, ssh_known_hosts=tmp_path / "known_hosts"))

Running as root (as the test suite does in CI): sshd insists on its privilege separation directory
(``/run/sshd``, compiled in) and creates nothing itself, so ``start()`` creates that empty,
root-owned directory when it is missing, as the distribution's tmpfiles rule would. Logins go to
``root`` (the config sets ``PermitRootLogin prohibit-password``, keys only).

Running as another user: sshd skips privilege separation, needs no ``/run/sshd``, and can only
log in the user it runs as; ``url()`` uses that user's name. That user needs a real login shell
(sshd runs ``git-upload-pack`` through it), as root has. Nothing else differs.

When sshd is not installed, :func:`require_sshd` fails the test with a clear message (CI installs
openssh-server through ``tools/ensure-system-packages.sh``, so a missing server is a broken set-up,
not a reason to skip). The only exception is a developer machine without root where sshd is
absent and cannot be installed: there it skips, saying why.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.support.mirror import free_port, wait_for_port

__all__ = ["SSHD", "Sshd", "make_ssh_key", "require_sshd"]

SSHD = Path("/usr/sbin/sshd")
_PRIVSEP_DIR = Path("/run/sshd")
_LOG_TAIL = 2000


def require_sshd() -> None:
    """Make sure ``/usr/sbin/sshd`` and ``ssh-keygen`` exist, else end the test.

    Fails the test when running as root (CI installs openssh-server, so its absence is a set-up
    defect that must be seen); skips only for a non-root user on a machine without sshd.
    """
    missing = [str(p) for p in (SSHD, Path("/usr/bin/ssh-keygen"), Path("/usr/bin/ssh")) if not p.exists()]
    if not missing:
        return
    message = (f"OpenSSH is not installed ({', '.join(missing)} missing); "
               "run `bash tools/ensure-system-packages.sh`")
    if os.geteuid() != 0:
        pytest.skip(message + " (not root, so it cannot be installed here)")
    pytest.fail(message, pytrace=False)


def make_ssh_key(path: Path, comment: str = "edge-fleet-test") -> Path:
    """Generate an unencrypted ed25519 key pair at ``path`` and ``path.pub``; return ``path``.

    Raises:
        subprocess.CalledProcessError: ssh-keygen failed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


class Sshd:
    """A real ``sshd`` on 127.0.0.1 serving logins for the current user with public keys only.

    Args:
        directory: where the config, host key, authorized_keys, pid file and log live.
        port: a fixed port (default: a free one, kept across stop()/start()).
        start_timeout: seconds to wait for the port to accept connections.
    """

    def __init__(self, directory: Path, *, port: int | None = None, start_timeout: float = 10.0) -> None:
        require_sshd()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.host_key = self.directory / "ssh_host_ed25519_key"
        self.authorized_keys = self.directory / "authorized_keys"
        self.config = self.directory / "sshd_config"
        self.pid_file = self.directory / "sshd.pid"
        self.log_file = self.directory / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        if not self.host_key.exists():
            make_ssh_key(self.host_key, "edge-fleet-test-host")
        self.authorized_keys.touch(mode=0o600, exist_ok=True)

    # -- keys ------------------------------------------------------------------------------------

    def authorize(self, public_key: Path) -> None:
        """Append the public key file ``public_key`` to the server's authorized_keys."""
        line = public_key.read_text(encoding="ascii").strip()
        with self.authorized_keys.open("a", encoding="ascii") as out:
            out.write(line + "\n")

    @property
    def host_public_key(self) -> str:
        """The server's host public key as ``"ssh-ed25519 AAAA..."`` (without the comment)."""
        kind, blob = self.host_key.with_suffix(".pub").read_text(encoding="ascii").split()[:2]
        return f"{kind} {blob}"

    def known_hosts_line(self) -> str:
        """The known_hosts line pinning this server: ``[127.0.0.1]:<port> ssh-ed25519 AAAA...``."""
        return f"[127.0.0.1]:{self.port} {self.host_public_key}\n"

    def write_known_hosts(self, path: Path) -> Path:
        """Write a known_hosts file holding only this server's host key; return ``path``."""
        path.write_text(self.known_hosts_line(), encoding="ascii")
        return path

    def url(self, repo_path: Path) -> str:
        """The ``ssh://user@127.0.0.1:<port>/<absolute path>`` URL of a repository on this machine."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{Path(repo_path).resolve()}"

    # -- process ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        """The server's whole log (sshd -e writes its log to stderr, kept in ``sshd.log``)."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        """The end of the server's log, for error messages."""
        return self.log_text()[-_LOG_TAIL:]

    def _write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            "AddressFamily inet",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "AcceptEnv GIT_PROTOCOL",
            "PermitUserEnvironment no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PermitTTY no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "LoginGraceTime 15",
            "MaxStartups 50",
            "LogLevel VERBOSE",
        ]
        self.config.write_text("\n".join(lines) + "\n", encoding="ascii")

    def start(self) -> None:
        """Start sshd on ``self.port`` and wait (bounded) until the port accepts connections.

        Raises:
            RuntimeError: the configuration is rejected or the server does not listen in time.
        """
        if self._proc is not None:
            return
        self._write_config()
        if os.geteuid() == 0 and not _PRIVSEP_DIR.is_dir():
            _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        check = subprocess.run([str(SSHD), "-t", "-f", str(self.config)], capture_output=True, timeout=30,
                               check=False)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejects its config: {check.stderr.decode(errors='replace').strip()}")
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        self._proc = proc
        try:
            wait_for_port(self.port, timeout=self.start_timeout, alive=lambda: proc.poll() is None)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; sshd log: {self.log_tail()}") from exc

    def stop(self) -> None:
        """Stop the server and its session children (same process group) by pid, and wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        # Per-connection children call setsid() and leave the group; each ends with its connection,
        # and the tests close every connection (the ssh client exits) before stopping the server.
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
