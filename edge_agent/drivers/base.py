"""The driver contract: observe the device, plan changes (pure), apply one change, back up, undo.

Every resource kind has one driver module (``file.py``, ``systemd.py`` …) with one stateless
driver instance registered by kind in :mod:`edge_agent.drivers`. The engine calls, per resource:

1. ``observe(res, ctx)`` — reads the device (through ``ctx.fs`` and ``ctx.runner``), writes nothing;
2. ``plan(res, observed, ctx)`` — a pure function of the resource, the observation and
   ``ctx.payloads``: the list of :class:`Change` objects that would bring the device in line
   (``[]`` means in sync). The plan *is* the dry run; ``apply`` never checks a dry-run flag;
3. for each change: ``snapshot(change, ctx)`` (backup records, journaled by the engine before
   anything is touched), then ``apply(change, ctx)`` (makes exactly that one change);
4. on failure, ``undo(record, ctx)`` for every journaled record, newest first. Records are
   idempotent to undo, so a half-applied change is undone the same way as a finished one.

Guarantees owned here, not by each driver:

* Errors are translated at one place: the public ``observe``, ``apply``, ``snapshot``, ``undo`` and
  ``spec_of`` call the kind's ``_observe``, ``_apply``, ``_snapshot``, ``_undo`` and ``_spec_of`` and
  turn any exception that is not one of the agent's own (an ``OSError``, ``ValueError``, a bug) into
  a :class:`DriverError` (:class:`ApplyError` for changes) whose one line names the kind, the step
  and the resource; the traceback goes to the debug log. The engine therefore catches only
  :class:`~edge_agent.errors.EdgeFleetError`.
* A driver never opens a device file itself: reads and writes go through ``ctx.fs``
  (:class:`edge_agent.fsafe.FsRoot`), which confines paths to the profile's allowed roots, refuses
  symlinked parents and special files, and writes atomically. The default :meth:`Driver.snapshot`
  captures every path a change writes (``change.paths``) before it is applied, recursively for
  deletes, and the default :meth:`Driver.undo` restores those captures.
* Non-file drivers keep their own record kinds, marked with a ``"type"`` key:
  ``{"type": "sysctl", "name", "value"}`` and ``{"type": "unit_state", "name", "enabled", "active"}``.
* Change fields (summary, diff, data) never carry secret plaintext; secret diffs read
  ``(secret content redacted)``.
* ``Change.data`` holds everything ``apply`` needs (apply gets no resource), JSON-able. It may also
  hold ``"expected"`` and ``"found"``: short human descriptions of the desired and observed state
  (e.g. ``"sha256 ab12cd34 mode 0644"``), used by drift reports; never secret content.

Capability rule: each driver has a :meth:`Driver.probe`. A release that uses a kind whose probe
fails (for instance ``systemd_unit`` on a device without ``systemctl``) is refused as a whole,
before anything is written, and reported with the probe's one-line reason. Kinds a release does
not use are never probed into a refusal.

Prune rule: a resource dropped from the release is handed to :meth:`Driver.prune` with its
:class:`edge_agent.state.Managed` row. When the path existed before the agent first managed it
(``managed.original`` is a capture record of something), prune restores that original; when the
agent created it (``original`` is a capture of kind ``absent``), prune deletes it. When
``original`` is ``None`` (no record: the agent never changed the path) the path is left in place,
so the engine must store the ``absent`` capture for paths the agent created.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.errors import ApplyError
from edge_agent.runner import CommandEnv
from edge_core.errors import DriverError, EdgeFleetError

if TYPE_CHECKING:
    from edge_agent.fsafe import FsRoot
    from edge_agent.runner import Runner
    from edge_agent.state import Managed
    from edge_core.resources import Resource, SecretFile

__all__ = [
    "ACTIONS",
    "REDACTED",
    "Change",
    "Context",
    "Driver",
    "get_driver",
    "is_absent_record",
    "path_prune_changes",
    "probe_kinds",
    "resource_spec",
    "spec_digest",
]

log = logging.getLogger(__name__)

ACTIONS = frozenset({
    "create", "update", "attrs", "delete", "restore", "restart", "enable", "disable", "start", "stop",
    "set", "run", "daemon-reload",
})
"""Every value :attr:`Change.action` may take."""

REDACTED = "(secret content redacted)"
"""The diff text of every change to a secret."""


@dataclass(frozen=True)
class Change:
    """One change a driver will make; the unit of journaling, backup and apply.

    Attributes:
        resource_id: the resource this change belongs to.
        kind: the resource kind (selects the driver that applies it).
        action: one of :data:`ACTIONS`.
        summary: one line for humans; never secret plaintext.
        diff: unified diff for text files, :data:`REDACTED` for secrets, ``""`` otherwise.
        paths: device paths this change writes; backed up before apply.
        data: JSON-able parameters for ``apply``; never secret plaintext.
    """

    resource_id: str
    kind: str
    action: str
    summary: str
    diff: str = ""
    paths: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise DriverError(f"unknown change action {self.action!r} for {self.resource_id}")


@dataclass
class Context:
    """What drivers may touch on this device, wired by the agent for one plan or transaction.

    Attributes:
        fs: the confined file system of the device.
        runner: runs commands (systemctl, sysctl, command resources).
        payloads: resource id -> bytes to write (file content, unit file, sealed secret document).
        open_secret: ``(resource, sealed document) -> plaintext`` with the device key.
        backup_store: directory where capture blobs are kept.
        secret_digest: keyed digest (HMAC-SHA256, device-local key) of secret content.
        command_env: the device and release commands of the release run for (their
            ``EDGE_FLEET_*`` variables, see :func:`edge_agent.runner.release_environment`).
        diffs: whether plans carry content diffs. Only a plan that is shown (``edge-agent plan``)
            needs them; a sync, a drift check and a preflight plan without, so they neither read
            the current content of a changed file nor hold a diff of every file they write.
    """

    fs: FsRoot
    runner: Runner
    payloads: Mapping[str, bytes]
    open_secret: Callable[[SecretFile, bytes], bytes]
    backup_store: Path
    secret_digest: Callable[[bytes], str]
    command_env: CommandEnv = field(default_factory=CommandEnv)
    diffs: bool = True


class Driver(ABC):
    """The contract every resource driver implements; see the module docstring."""

    kind: ClassVar[str] = ""

    def probe(self, ctx: Context) -> str | None:
        """Return ``None`` when this driver can work on this device, else a one-line reason."""
        return None

    def observe(self, res: Resource, ctx: Context) -> Any:
        """Read the current state of ``res`` on the device; writes nothing.

        Raises:
            ConfinementError: the path is outside the allowed roots, behind a symlink or special.
            DriverError: the state cannot be read (any failure that is not one of the agent's own
                errors is turned into one here, naming the resource).
        """
        with _translated(DriverError, lambda: f"{self.kind}: cannot observe {res.id}"):
            return self._observe(res, ctx)

    @abstractmethod
    def _observe(self, res: Resource, ctx: Context) -> Any:
        """The kind's own reading of ``res`` (see :meth:`observe`)."""

    @abstractmethod
    def plan(self, res: Resource, observed: Any, ctx: Context) -> list[Change]:
        """Return the changes that bring ``res`` from ``observed`` to desired (``[]`` when in sync).

        Pure: depends only on its arguments and ``ctx.payloads`` (and, for secrets, the
        deterministic ``ctx.open_secret`` / ``ctx.secret_digest``).
        """

    def apply(self, change: Change, ctx: Context) -> None:
        """Make exactly one planned change.

        Raises:
            ApplyError: the change could not be made (any failure that is not one of the agent's
                own errors is turned into one here, naming the change).
            ConfinementError: a path turned out to be unsafe.
        """
        with _translated(ApplyError, lambda: f"{self.kind}: cannot {change.action} {change.resource_id}"):
            self._apply(change, ctx)

    @abstractmethod
    def _apply(self, change: Change, ctx: Context) -> None:
        """The kind's own making of ``change`` (see :meth:`apply`)."""

    def snapshot(self, change: Change, ctx: Context) -> list[dict[str, Any]]:
        """Return the backup records to journal before ``change`` is applied.

        Raises:
            ApplyError: the backup could not be taken (foreign failures are turned into one here).
            ConfinementError: a path turned out to be unsafe.
        """
        with _translated(ApplyError, lambda: f"{self.kind}: cannot back up {change.resource_id}"):
            return self._snapshot(change, ctx)

    def _snapshot(self, change: Change, ctx: Context) -> list[dict[str, Any]]:
        """The kind's backup records for ``change``.

        The default captures every path of ``change.paths`` through ``ctx.fs.capture`` (blobs
        fsync'd in ``ctx.backup_store``), recursively when the change deletes.
        """
        recursive = change.action == "delete"
        return [ctx.fs.capture(p, ctx.backup_store, recursive=recursive) for p in change.paths]

    def undo(self, record: Mapping[str, Any], ctx: Context) -> None:
        """Put back what one backup record describes; idempotent.

        Raises:
            ApplyError: the record cannot be restored (foreign failures are turned into one here).
        """
        with _translated(ApplyError, lambda: f"{self.kind}: cannot undo {_record_name(record)}"):
            self._undo(record, ctx)

    def _undo(self, record: Mapping[str, Any], ctx: Context) -> None:
        """The kind's restoring of ``record``; the default restores an ``fsafe`` capture record."""
        if "type" in record and record["type"] in ("sysctl", "unit_state"):
            raise ApplyError(f"driver {self.kind} cannot undo a {record['type']} record")
        ctx.fs.restore(dict(record), ctx.backup_store)

    def prune(self, managed: Managed, ctx: Context) -> list[Change]:
        """Return the changes that remove a resource dropped from the release.

        The default handles single-path kinds whose spec holds ``"path"``: restore the original
        when the path existed before the agent managed it, else delete what the agent created
        (nothing when it is already gone).
        """
        path = managed.spec.get("path")
        if not isinstance(path, str):
            return []
        return path_prune_changes(managed.resource_id, managed.kind, path, managed.original, ctx)

    def original_of(self, res: Resource, records: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Pick, from the backup records of a resource's first change, what to remember as original.

        The default is the capture of the resource's own path when one is among ``records`` (a
        change creating missing parents captures them first), else the first record, else None.
        """
        own = set(res.paths)
        for record in records:
            if record.get("path") in own:
                return record
        return records[0] if records else None

    def spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """Return ``(spec, digest)`` remembered in the state database; never secret plaintext.

        Raises:
            DriverError: the spec cannot be made (foreign failures are turned into one here).
        """
        with _translated(DriverError, lambda: f"{self.kind}: cannot describe {res.id}"):
            return self._spec_of(res, ctx)

    def _spec_of(self, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
        """The kind's spec of ``res``: the default is its fields plus the SHA-256 of its payload."""
        spec = resource_spec(res)
        payload = ctx.payloads.get(res.id)
        if payload is not None:
            spec["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        return spec, spec_digest(spec)

    # --- helpers shared by the drivers -------------------------------------------------------

    def restore_change(self, change: Change, ctx: Context) -> None:
        """Apply a ``restore`` change made by :meth:`prune`.

        Raises:
            ApplyError: the change carries no record, or restoring fails.
        """
        record = change.data.get("record")
        if not isinstance(record, Mapping):
            raise ApplyError(f"restore of {change.resource_id} carries no backup record")
        ctx.fs.restore(dict(record), ctx.backup_store)

    def unsupported(self, change: Change) -> ApplyError:
        """Return the error for an action this driver does not know."""
        return ApplyError(f"driver {self.kind} cannot apply action {change.action!r} ({change.resource_id})")


@contextmanager
def _translated(cls: type[DriverError], what: Callable[[], str]) -> Iterator[None]:
    """The one place a driver's foreign error is translated: the agent's own errors pass as they
    are; any other becomes ``cls`` naming ``what()`` (built only on failure)."""
    try:
        yield
    except EdgeFleetError:
        raise
    except Exception as exc:
        raise _foreign(cls, what(), exc) from exc


def _record_name(record: object) -> str:
    """What a backup record restores, for a message: its path or name, else "a backup record"."""
    name = (record.get("path") or record.get("name")) if isinstance(record, Mapping) else None
    return str(name) if name else "a backup record"


def _foreign(cls: type[DriverError], what: str, exc: Exception) -> DriverError:
    """The driver error for a failure that is not one of the agent's own: one line, naming it.

    The traceback goes to the debug log only: a user sees the one-line reason.
    """
    log.debug("%s", what, exc_info=exc)
    text = " ".join(str(exc).split())[:300]
    return cls(f"{what}: {type(exc).__name__}: {text}" if text else f"{what}: {type(exc).__name__}")


def path_prune_changes(resource_id: str, kind: str, path: str, original: Mapping[str, Any] | None,
                       ctx: Context) -> list[Change]:
    """Return the change that gives ``path`` back its pre-agent state when it stops being managed.

    ``original`` is the capture record taken before the agent's first change to the path:
    a record of something -> ``restore`` it; an ``absent`` record -> ``delete`` what the agent
    created (nothing when already gone); ``None`` (unknown: the agent never changed the path, or
    the record is of another type) -> leave the path in place.

    Raises:
        ConfinementError: the path is behind a symlink.
    """
    if original is None or "kind" not in original or original.get("path") != path:
        log.info("leaving %s in place: no record of what was there before %s managed it", path, resource_id)
        return []
    if not is_absent_record(original):
        return [Change(resource_id, kind, "restore", f"restore the original {path} (no longer managed)",
                       paths=(path,), data={"path": path, "record": dict(original)})]
    if ctx.fs.lstat(path) is None:
        return []
    return [Change(resource_id, kind, "delete", f"delete {path} (no longer managed)", paths=(path,),
                   data={"path": path})]


def is_absent_record(record: Mapping[str, Any]) -> bool:
    """Tell whether a capture record says nothing existed at its path."""
    return record.get("kind") == "absent" or record.get("type") == "absent"


def resource_spec(res: Resource) -> dict[str, Any]:
    """Return the fields of ``res`` as a JSON-able dict (tuples become lists), with its kind."""
    spec: dict[str, Any] = {"kind": res.kind}
    for f in fields(res):
        value = getattr(res, f.name)
        spec[f.name] = list(value) if isinstance(value, tuple) else value
    return spec


def spec_digest(spec: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of ``spec`` serialised as sorted, compact JSON."""
    raw = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def get_driver(kind: str) -> Driver:
    """Return the registered driver for ``kind``.

    Raises:
        DriverError: no driver handles that kind.
    """
    from edge_agent.drivers import REGISTRY  # noqa: PLC0415  (the registry imports every driver module)

    try:
        return REGISTRY[kind]
    except KeyError:
        raise DriverError(f"no driver for resource kind {kind!r}") from None


def probe_kinds(kinds: Iterable[str], ctx: Context) -> dict[str, str]:
    """Probe the drivers of ``kinds``; return kind -> reason for each one unusable here.

    Raises:
        DriverError: a kind has no driver.
    """
    unavailable: dict[str, str] = {}
    for kind in sorted(set(kinds)):
        reason = get_driver(kind).probe(ctx)
        if reason is not None:
            log.warning("driver %s is unavailable: %s", kind, reason)
            unavailable[kind] = reason
    return unavailable


def __getattr__(name: str) -> Mapping[str, Driver]:
    """Expose ``REGISTRY`` lazily (it lives in :mod:`edge_agent.drivers`, which imports this)."""
    if name == "REGISTRY":
        import edge_agent.drivers as package  # noqa: PLC0415  (import cycle)

        return package.REGISTRY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
