"""TLS client contexts that verify the peer against the system's trust store and read its CA
certificates on demand.

:func:`ssl.create_default_context` parses every certificate of the system's CA bundle when it is
made (144 on Debian 12): 1.5-1.7 MiB more resident memory in a process holding the daemon's
imports, against 0.4-0.5 MiB for :func:`client_context` (three runs of ``bench.bench_footprint``,
docs/benchmarks.md), on the agent's 40 MB budget. OpenSSL can instead look a CA up in the hashed certificate
directory (``/etc/ssl/certs``, kept by ``update-ca-certificates``) when a handshake needs it, which
trusts exactly the same certificates. :func:`client_context` does that, and falls back to the
whole bundle on a system without a hashed directory.

``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` in the environment name another bundle or directory, as for
any OpenSSL program.
"""

from __future__ import annotations

import os
import re
import ssl

__all__ = ["client_context"]

_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.\d+")


def _hashed_directory(path: str | None) -> bool:
    """Whether ``path`` is a directory holding OpenSSL's hashed certificate names."""
    if not path:
        return False
    try:
        with os.scandir(path) as entries:
            return any(_HASHED_NAME.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies the peer's certificate and host name (TLS 1.2 at least),
    trusting ``ca_file`` when given, else the system's trust store with its CAs read on demand.

    Raises:
        OSError: ``ca_file`` or the bundle ``SSL_CERT_FILE`` names cannot be read.
        ssl.SSLError: it holds no certificate OpenSSL can use.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        ctx.load_verify_locations(cafile=ca_file)
        return ctx
    paths = ssl.get_default_verify_paths()
    named = os.environ.get(paths.openssl_cafile_env)
    if named:
        ctx.load_verify_locations(cafile=named)
    if _hashed_directory(paths.capath):
        ctx.load_verify_locations(capath=paths.capath)
    elif not named:
        ctx.load_default_certs()  # no hashed directory here: the whole bundle, as OpenSSL's default
    return ctx
