"""The base of the exception tree: the errors of the formats and checks the device and the server share.

    EdgeFleetError
    ├── ConfigError (ValueError)            agent.yaml or a device profile is invalid
    ├── UntrustedInputError                 input from Git / a mirror / the server failed a check
    │   ├── ManifestError (ValueError)      malformed, truncated or non-canonical manifest
    │   │   └── ManifestTooLarge            over the size cap, refused before parsing
    │   ├── SignatureError                  a signature is not valid where one must be
    │   │   ├── UntrustedKeyError           no trusted key signed it
    │   │   └── ThresholdError              fewer valid distinct trusted signatures than k
    │   ├── ExpiredError                    the manifest's expiry is in the past
    │   ├── RollbackError                   version below the highest verified rollback floor
    │   ├── FileIntegrityError              the tree does not match the manifest
    │   │   ├── FileHashMismatch            content or size differs
    │   │   ├── FileMissing                 listed in the manifest, absent from the tree
    │   │   └── UnlistedFile                in the tree, not listed in the manifest
    │   ├── RootRotationError               a new key set not signed by the old threshold
    │   ├── PathError (ValueError)          `..`, absolute escape, NUL, non-normalised path
    │   │   └── ConfinementError            outside the allowed roots / through a symlink / special file
    │   ├── BundleError (ValueError)        a bundle, fleet.yaml or overlay breaks the format (located)
    │   │   └── YamlError                   the YAML text is malformed, too large or uses aliases
    │   ├── SecretError                     a sealed secret cannot be opened
    │   │   ├── NotARecipientError          this device's key is not among the recipients
    │   │   └── SecretIntegrityError        tampered, or moved to another secret id / version
    │   └── MessageError (ValueError)       an MQTT message is oversized, malformed or spoofed
    ├── TransportError (OSError)            the network or a peer failed; retry later
    │   ├── FetchError                      the Git mirror
    │   └── BrokerError                     the MQTT broker
    ├── StateError                          the local state (device SQLite, server store) cannot be used
    ├── KeyFileError                        a key file is missing, unreadable or malformed
    └── DriverError                         a resource driver failed
        └── DriverUnavailable               the driver cannot work on this device (probe, profile policy)

Untrusted-input errors are final for that input (never retried); transport errors are retried with
backoff. Every error's ``str()`` is a one-line reason fit for a user. The device-runtime errors
(``ApplyError``, ``HealthCheckFailed``, ``LockedError``) subclass these in :mod:`edge_agent.errors`.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BundleError",
    "ConfigError",
    "ConfinementError",
    "DriverError",
    "DriverUnavailable",
    "EdgeFleetError",
    "ExpiredError",
    "FetchError",
    "FileHashMismatch",
    "FileIntegrityError",
    "FileMissing",
    "KeyFileError",
    "LocatedError",
    "ManifestError",
    "ManifestTooLarge",
    "MessageError",
    "NotARecipientError",
    "PathError",
    "RollbackError",
    "RootRotationError",
    "SecretError",
    "SecretIntegrityError",
    "SignatureError",
    "StateError",
    "ThresholdError",
    "TransportError",
    "UnlistedFile",
    "UntrustedInputError",
    "UntrustedKeyError",
    "YamlError",
]


class EdgeFleetError(Exception):
    """Root of every error the project raises on purpose (the server also has its own root)."""


class ConfigError(EdgeFleetError, ValueError):
    """agent.yaml or a device profile is invalid; names the field and the reason."""


class UntrustedInputError(EdgeFleetError):
    """Input from an untrusted source (Git host, mirror, server) failed a check."""


class ManifestError(UntrustedInputError, ValueError):
    """The release manifest (or root metadata) is malformed, truncated or not canonical."""


class ManifestTooLarge(ManifestError):
    """The manifest exceeds the size cap and was refused before parsing."""


class SignatureError(UntrustedInputError):
    """A signature check failed."""


class UntrustedKeyError(SignatureError):
    """No key of the trust root signed the metadata."""


class ThresholdError(SignatureError):
    """Fewer distinct trusted keys signed validly than the threshold requires."""


class ExpiredError(UntrustedInputError):
    """The signed metadata has expired."""


class RollbackError(UntrustedInputError):
    """The release version is below the highest rollback floor already verified."""


class FileIntegrityError(UntrustedInputError):
    """The files of the release do not match the signed manifest."""


class FileHashMismatch(FileIntegrityError):
    """A file's SHA-256 or size differs from the manifest."""


class FileMissing(FileIntegrityError):
    """A file listed in the manifest is not in the tree."""


class UnlistedFile(FileIntegrityError):
    """A file in the tree is not listed in the manifest."""


class RootRotationError(UntrustedInputError):
    """A new trusted-key set is not signed by the old threshold (or is otherwise invalid)."""


class PathError(UntrustedInputError, ValueError):
    """A path is malformed: traversal, NUL byte, not absolute or not normalised."""


class ConfinementError(PathError):
    """A path leaves the allowed roots, passes through a symlink, or names a special file."""


class LocatedError(Exception):
    """An error in a YAML document that names where: ``where`` is the location inside the document
    (keys and list indexes from its top), so that ``fleetctl lint`` can map it to a line; ``file`` is
    the repo-relative file when known. A mixin of :class:`BundleError` and the server's ``PlanError``."""

    def __init__(self, reason: str, where: tuple[str | int, ...] = (), file: str = "") -> None:
        self.reason = reason
        self.where = where
        self.file = file
        loc = ".".join(str(p) for p in where)
        prefix = f"{file}: " if file else ""
        super().__init__(f"{prefix}{loc + ': ' if loc else ''}{reason}")


class BundleError(LocatedError, UntrustedInputError, ValueError):
    """A bundle, overlay or fleet.yaml does not follow the config-repo format (located: see
    :class:`LocatedError`)."""


class YamlError(BundleError):
    """The YAML text is malformed, over the size cap, or uses a refused feature; ``line`` is 1-based."""

    def __init__(self, reason: str, line: int, file: str = "") -> None:
        super().__init__(f"line {line}: {reason}", (), file)
        self.line = line


class SecretError(UntrustedInputError):
    """A sealed secret cannot be opened."""


class NotARecipientError(SecretError):
    """This device's encryption key is not a recipient of the sealed secret."""


class SecretIntegrityError(SecretError):
    """The sealed secret was tampered with, or moved to another id or version."""


class MessageError(UntrustedInputError, ValueError):
    """An MQTT message failed validation; ``reason`` is a short stable code for counting drops.

    Codes: ``oversized``, ``malformed_json``, ``bad_schema``, ``spoofed``, ``bad_field``.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


class TransportError(EdgeFleetError, OSError):
    """A network peer failed; the operation may be retried later."""


class FetchError(TransportError):
    """Fetching from the Git mirror failed."""


class BrokerError(TransportError):
    """Talking to the MQTT broker failed."""


class StateError(EdgeFleetError):
    """The local state database cannot be read or written."""


class KeyFileError(EdgeFleetError):
    """A key file is missing, unreadable, has unsafe permissions or is malformed."""


class DriverError(EdgeFleetError):
    """A resource driver failed."""


class DriverUnavailable(DriverError):
    """The driver cannot work on this device (its capability probe failed)."""
