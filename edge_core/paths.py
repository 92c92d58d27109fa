"""Pure checks on paths named by untrusted input (bundles, manifests, sealed-secret references)."""

from __future__ import annotations

import functools
import posixpath

from edge_core.errors import ConfinementError, PathError

__all__ = ["is_under", "validate_device_path", "validate_repo_path"]


def validate_device_path(path: object) -> str:
    """Return ``path`` if it is an absolute, normalised device path; raise PathError otherwise.

    Refused: non-strings, empty, NUL bytes, relative paths, ``.``/``..`` components, doubled or
    trailing slashes, and the root itself.
    """
    if not isinstance(path, str) or not path:
        raise PathError("path must be a non-empty string")
    if "\x00" in path:
        raise PathError(f"path contains a NUL byte: {path!r}")
    if not path.startswith("/"):
        raise PathError(f"path must be absolute: {path!r}")
    parts = path.split("/")[1:]
    if path == "/" or any(p in ("", ".", "..") for p in parts):
        raise PathError(f"path is not normalised or escapes with '..': {path!r}")
    return path


def validate_repo_path(path: object) -> str:
    """Return ``path`` if it is a safe repo-relative POSIX path; raise PathError otherwise."""
    if not isinstance(path, str) or not path:
        raise PathError("repo path must be a non-empty string")
    if "\x00" in path:
        raise PathError(f"repo path contains a NUL byte: {path!r}")
    if path.startswith("/") or "\\" in path:
        raise PathError(f"repo path must be relative, with '/' separators: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise PathError(f"repo path is not normalised or escapes with '..': {path!r}")
    return path


@functools.lru_cache(maxsize=256)
def _prefixes(roots: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``(root, root + "/")`` for each normalised root: the roots of a profile are few and fixed."""
    out = []
    for root in roots:
        r = posixpath.normpath(root)
        out.append((r, "/" if r == "/" else r + "/"))
    return tuple(out)


def is_under(path: str, roots: tuple[str, ...]) -> bool:
    """Tell whether the normalised absolute ``path`` is one of ``roots`` or lies below one."""
    return any(root == path or path.startswith(prefix) for root, prefix in _prefixes(roots))


def check_confined(path: str, roots: tuple[str, ...]) -> str:
    """Return ``path`` validated and inside ``roots``; raise PathError/ConfinementError."""
    validate_device_path(path)
    if not is_under(path, roots):
        raise ConfinementError(f"{path} is outside the allowed roots {', '.join(roots)}")
    return path


__all__ += ["check_confined"]
