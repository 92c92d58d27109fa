"""Where `fleetctl` finds the fleet server and its API token: options, environment, config file.

Precedence, for each of the two: a command-line option, else an environment variable, else the
config file, else the default.

* server: ``--server URL``, else ``$FLEET_SERVER``, else the context's ``server``, else
  ``http://127.0.0.1:8080``;
* token: ``--token-file FILE``, else ``$FLEET_TOKEN`` (the token itself), else the context's
  ``token_file`` or ``token``, else none.

The config file is ``$XDG_CONFIG_HOME/edge-fleet/fleetctl.yaml`` (``~/.config/edge-fleet/`` when
``XDG_CONFIG_HOME`` is unset). It holds named contexts and the one used by default::

    current: prod
    contexts:
      prod: {server: "https://fleet.example:8443", token_file: prod.token}
      lab:  {server: "http://127.0.0.1:8080", token: "..."}

``--context NAME`` (else ``$FLEET_CONTEXT``, else ``current``) picks one. A relative
``token_file`` is relative to the config directory. ``fleetctl config set`` writes the file: the
directory is created 0700 and the file 0600. A file holding a ``token`` that group or others may
read is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from edge_core.config_section import ConfigSection
from fleet_server.errors import UsageError

__all__ = ["CONFIG_NAME", "DEFAULT_SERVER", "Client", "config_dir", "config_path", "read_token",
           "resolve_client", "save_context", "server_url"]

DEFAULT_SERVER = "http://127.0.0.1:8080"
CONFIG_NAME = "fleetctl.yaml"
_MAX_TOKEN_BYTES = 4096
_CONTEXT_KEYS = frozenset({"server", "token", "token_file"})


class _Section(ConfigSection):
    error: ClassVar[type[Exception]] = UsageError
    document: ClassVar[str] = "fleetctl config"


@dataclass(frozen=True, repr=False)
class Client:
    """The fleet server to call and the bearer token to send (None: no token)."""

    server: str
    token: str | None

    def __repr__(self) -> str:
        """Name the server, never the token."""
        return f"Client(server={self.server!r}, token={'***' if self.token else None})"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_CONFIG_HOME/edge-fleet`` (``~/.config/edge-fleet`` without it)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "edge-fleet"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """Return the path of fleetctl's config file (it need not exist)."""
    return config_dir(env) / CONFIG_NAME


def server_url(option: str | None, fallback: str | None = None) -> str:
    """Return the server base URL from ``option``, ``$FLEET_SERVER``, ``fallback`` or the default,
    without a trailing ``/``.

    Raises:
        UsageError: the URL is not http:// or https:// with a host.
    """
    url = option or os.environ.get("FLEET_SERVER") or fallback or DEFAULT_SERVER
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"fleet server URL must be http://HOST[:PORT] or https://..., got {url!r}")
    return url.rstrip("/")


def read_token(path: Path | None) -> str | None:
    """Return the API token held in the file at ``path``, or None when no file is given.

    Raises:
        UsageError: the file cannot be read, is empty or is over 4 KiB.
    """
    if path is None:
        return None
    try:
        with Path(path).expanduser().open("rb") as handle:
            data = handle.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    token = data.strip().decode("utf-8", "replace")
    if not token or len(data) > _MAX_TOKEN_BYTES:
        raise UsageError(f"token file {path} is empty or too large")
    return token


@dataclass(frozen=True)
class _Context:
    server: str | None
    token: str | None
    token_file: Path | None


def _load_context(path: Path, name: str | None) -> _Context | None:
    """Return the named (else the current) context of the config file at ``path``; None without one.

    Raises:
        UsageError: the file is unreadable, malformed, names an unknown context, or holds a token
            that group or others may read.
    """
    if not path.exists():
        if name:
            raise UsageError(f"no context {name!r}: {path} does not exist (fleetctl config set "
                             "--context NAME --server URL writes it)")
        return None
    raw = _Section.read_yaml(path)
    top = _Section(raw, "", frozenset({"current", "contexts"}), path.parent)
    contexts = top.raw.get("contexts") or {}
    if not isinstance(contexts, Mapping):
        raise UsageError(f"{path}: contexts: must be a mapping of names to contexts")
    chosen = name or top.opt_str("current")
    if chosen is None:
        return None
    if chosen not in contexts:
        known = ", ".join(sorted(str(k) for k in contexts)) or "none"
        raise UsageError(f"{path}: no context {chosen!r} (known: {known})")
    section = _Section(contexts[chosen], f"contexts.{chosen}", _CONTEXT_KEYS, path.parent)
    token = section.opt_str("token")
    if token is not None and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{path} holds a token and group or others may read it: chmod 600 {path}")
    token_file = section.opt_str("token_file")
    where = None if token_file is None else path.parent / Path(token_file).expanduser()
    return _Context(server=section.opt_str("server"), token=token, token_file=where)


def resolve_client(server: str | None, token_file: Path | None, context: str | None = None,
                   env: Mapping[str, str] | None = None) -> Client:
    """Return the server and token a command uses: option, else environment, else config file.

    Raises:
        UsageError: a bad URL, an unreadable token file or a bad config file (one line why).
    """
    env = os.environ if env is None else env
    name = context or env.get("FLEET_CONTEXT") or None
    needs_file = name is not None or not (server or env.get("FLEET_SERVER")) or not (
        token_file or env.get("FLEET_TOKEN"))
    ctx = _load_context(config_path(env), name) if needs_file else None
    url = server_url(server, ctx.server if ctx else None)
    if token_file is not None:
        return Client(url, read_token(token_file))
    if env.get("FLEET_TOKEN", "").strip():
        return Client(url, env["FLEET_TOKEN"].strip())
    if ctx is not None and ctx.token_file is not None:
        return Client(url, read_token(ctx.token_file))
    return Client(url, ctx.token if ctx else None)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def save_context(name: str, *, server: str | None, token_file: Path | None, token: str | None,
                 use: bool, env: Mapping[str, str] | None = None) -> Path:
    """Write (or update) context ``name`` in the config file; make it current when ``use``.

    The directory is made 0700 and the file is written 0600 (atomically). Returns the file's path.

    Raises:
        UsageError: the existing file is malformed, or a value is invalid.
    """
    path = config_path(env)
    doc: dict[str, Any] = {}
    if path.exists():
        loaded = _Section.read_yaml(path)
        _Section(loaded, "", frozenset({"current", "contexts"}), path.parent)
        doc = dict(loaded) if isinstance(loaded, Mapping) else {}
    contexts = dict(doc.get("contexts") or {})
    entry = dict(contexts.get(name) or {})
    if server is not None:
        entry["server"] = server_url(server)
    if token_file is not None:
        entry["token_file"] = str(Path(token_file).expanduser().resolve())
        entry.pop("token", None)
    if token is not None:
        entry["token"] = token
        entry.pop("token_file", None)
    contexts[name] = entry
    doc["contexts"] = contexts
    if use or "current" not in doc:
        doc["current"] = name
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(yaml.safe_dump(doc, sort_keys=True, default_flow_style=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
