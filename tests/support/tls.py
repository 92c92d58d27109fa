"""Throwaway X.509 certificates for TLS tests, made by the ``openssl`` command: a CA, and a server
certificate for 127.0.0.1 and localhost that it signs; and hashed certificate directories (a trust
store as ``update-ca-certificates`` keeps one) holding them."""

from __future__ import annotations

import re
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certificates", "hashed_store", "make_ca"]


def _openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr


@dataclass(frozen=True)
class Certificates:
    """A CA certificate, and a server certificate and key it signed for 127.0.0.1 and localhost."""

    ca: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the server certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx


def make_ca(directory: Path, name: str = "edge-fleet test CA") -> Certificates:
    """Make a CA and a server certificate in ``directory`` (created); valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=directory)
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=directory)
    return Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def hashed_store(directory: Path, *cas: Path, system: bool = False) -> Path:
    """Make ``directory`` a trust store of ``<subject hash>.0`` links to ``cas`` and, with ``system``,
    to every CA of the system's own hashed directory too; return it."""
    directory.mkdir(parents=True)
    if system:
        system_dir = ssl.get_default_verify_paths().capath
        assert system_dir is not None, "the system has no hashed certificate directory"
        for entry in Path(system_dir).iterdir():
            if re.fullmatch(r"[0-9a-f]{8}\.\d+", entry.name):
                (directory / entry.name).symlink_to(entry.resolve())
    for ca in cas:
        digest = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(ca)], capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        (directory / f"{digest}.0").symlink_to(ca)
    return directory
