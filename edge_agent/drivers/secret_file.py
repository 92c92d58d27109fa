"""The ``secret_file`` driver: a file whose content is a sealed secret, opened only on the device.

The payload of a ``secret_file`` resource is the SEALED document from the repo, never plaintext.
The driver opens it with ``ctx.open_secret(res, sealed)`` (the agent wires
:func:`edge_core.trust.sealed.open_sealed` with the device key), and the secret id the sealed
document must declare is the sealed file's name without ``.sealed.json``:
``secrets/wifi-psk.sealed.json`` -> ``wifi-psk`` (see :func:`expected_secret_id`), so a sealed
document moved to another name is refused.

Observe reads the current file (at most 1 MiB) and keeps only its keyed digest
(``ctx.secret_digest``: HMAC-SHA256 with a device-local key); plan compares it with the keyed
digest of the opened secret. Plaintext is never put into a :class:`Change` (summary, diff, data),
the diff is ``(secret content redacted)``, and ``spec_of`` remembers only the SHA-256 of the sealed
document and the keyed digest. Apply opens the sealed document again and writes it through
``ctx.fs`` with mode 0600 unless another is declared; the mode is enforced on an existing file
too (a secret is never left with a looser mode it happened to have).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from edge_agent.drivers.base import Change, Context, Driver, spec_digest
from edge_agent.drivers.file import (
    FileObserved,
    apply_file_change,
    content_changes,
    missing_parents,
    payload_of,
    resolve_accounts,
)
from edge_agent.errors import ApplyError
from edge_core.errors import ConfinementError
from edge_core.resources import Resource, SecretFile
from edge_core.trust.sealed import secret_id_from_path

__all__ = ["SECRET_READ_MAX", "SecretFileDriver", "expected_secret_id"]

SECRET_READ_MAX = 1024 * 1024
"""A current file larger than this is treated as different content without being read."""

_SECRET_MODE = 0o600


def expected_secret_id(res: SecretFile) -> str:
    """Return the secret id the sealed file of ``res`` must declare (its name minus ``.sealed.json``).

    Raises:
        SecretError: the file name is not ``<id>.sealed.json`` with a safe id.
    """
    return secret_id_from_path(res.secret)


class SecretFileDriver(Driver):
    """Files holding opened sealed secrets."""

    kind: ClassVar[str] = "secret_file"

    def _observe(self, res: Resource, ctx: Context) -> FileObserved:
        """Observe the file; ``sha256`` of the result holds the KEYED digest of its content.

        Raises:
            ConfinementError: not a regular file, or behind a symlink.
        """
        assert isinstance(res, SecretFile)
        accounts = resolve_accounts(res.owner, res.group)
        entry = ctx.fs.lstat(res.path)
        if entry is None:
            return FileObserved(None, None, None, missing_parents(ctx.fs, res.path), accounts)
        if entry.kind != "file":
            raise ConfinementError(f"{res.path} is a {entry.kind}, not a regular file; refusing to manage it")
        digest = "too-large"
        if entry.size <= SECRET_READ_MAX:
            digest = ctx.secret_digest(ctx.fs.read_file(res.path, max_bytes=SECRET_READ_MAX))
        return FileObserved(entry, digest, None, (), accounts)

    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Plan create/update/attrs with the secret redacted.

        Raises:
            SecretError: the sealed document cannot be opened by this device.
            DriverError: no payload for the resource.
        """
        assert isinstance(res, SecretFile)
        sealed = payload_of(res.id, ctx)
        plain = ctx.open_secret(res, sealed)
        extra = {"secret": res.secret, "bundle": res.bundle, "owner": res.owner, "group": res.group,
                 "sealed_sha256": hashlib.sha256(sealed).hexdigest()}
        mode = _SECRET_MODE if res.mode is None else res.mode  # enforced, even on an existing file
        return content_changes(res.id, self.kind, res.path, plain, observed, mode=mode,
                               default_mode=_SECRET_MODE, secret=True,
                               desired_digest=ctx.secret_digest(plain), extra=extra)

    def _apply(self, change: Change, ctx: Context) -> None:
        """Open the sealed document again and write (or re-attribute, delete, restore) the file.

        Raises:
            ApplyError: the sealed payload changed since the plan, or the write failed.
            SecretError: the sealed document cannot be opened.
        """
        if change.action in ("create", "update"):
            data = change.data
            sealed = payload_of(change.resource_id, ctx)
            if hashlib.sha256(sealed).hexdigest() != data.get("sealed_sha256"):
                raise ApplyError(f"the sealed payload of {change.resource_id} changed since the plan")
            res = SecretFile(id=change.resource_id, bundle=str(data["bundle"]), path=str(data["path"]),
                             mode=data.get("mode"), owner=data.get("owner"), group=data.get("group"),
                             secret=str(data["secret"]))
            apply_file_change(change, ctx, ctx.open_secret(res, sealed))
        elif change.action == "attrs":
            apply_file_change(change, ctx, None)
        elif change.action == "delete":
            ctx.fs.remove(str(change.data["path"]))
        elif change.action == "restore":
            self.restore_change(change, ctx)
        else:
            raise self.unsupported(change)

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return path, attributes, the sealed document's SHA-256 and the keyed content digest.

        Raises:
            SecretError: the sealed document cannot be opened by this device.
        """
        assert isinstance(res, SecretFile)
        sealed = payload_of(res.id, ctx)
        spec = {"kind": self.kind, "path": res.path, "mode": res.mode, "owner": res.owner, "group": res.group,
                "secret": res.secret, "sealed_sha256": hashlib.sha256(sealed).hexdigest(),
                "content_digest": ctx.secret_digest(ctx.open_secret(res, sealed))}
        return spec, spec_digest(spec)
