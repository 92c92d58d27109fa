"""A ``file://`` mirror whose tree entry says "tree" but names a blob (or says "blob" but names a
tree) is refused by the fetch with a reason naming the entry; before the fix the first ended as
``fetch failed: AttributeError`` and the second was fetched and only refused later when read."""

from __future__ import annotations

from pathlib import Path

import pytest
from dulwich.objects import Blob, Commit, Tree
from dulwich.repo import Repo

from edge_core.errors import FetchError
from edge_core.source import Source


def _crafted_mirror(path: Path, mode: int, target: str) -> tuple[str, str]:
    """A bare repository whose only commit's tree holds ``entry`` with ``mode`` naming a ``target``
    ("blob" or "tree") object; return (commit sha, target sha)."""
    repo = Repo.init_bare(str(path), mkdir=True)
    blob = Blob.from_string(b"not a tree\n")
    inner = Tree()
    inner.add(b"file.txt", 0o100644, blob.id)
    obj = blob if target == "blob" else inner
    root = Tree()
    root.add(b"entry", mode, obj.id)
    commit = Commit()
    commit.tree = root.id
    commit.author = commit.committer = b"Test Operator <operator@example.invalid>"
    commit.author_time = commit.commit_time = 0
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = b"crafted\n"
    for o in (blob, inner, root, commit):
        repo.object_store.add_object(o)
    repo.refs[b"refs/heads/main"] = commit.id
    repo.close()
    return commit.id.decode(), obj.id.decode()


@pytest.mark.parametrize(("mode", "target", "says"), [
    (0o040000, "blob", "is a blob where the tree says tree"),
    (0o100644, "tree", "is a tree where the tree says blob"),
], ids=["tree-entry-names-a-blob", "blob-entry-names-a-tree"])
def test_tree_entry_of_the_wrong_type_is_a_fetch_error(tmp_path: Path, mode: int, target: str,
                                                       says: str) -> None:
    commit, target_sha = _crafted_mirror(tmp_path / "mirror.git", mode, target)
    cache = tmp_path / "cache"
    with Source(f"file://{tmp_path / 'mirror.git'}", "main", cache) as source:
        with pytest.raises(FetchError) as caught:
            source.fetch()
        assert str(caught.value) == f"tree entry {target_sha} {says}"
        assert "AttributeError" not in str(caught.value)
        with pytest.raises(FetchError, match="not in the cache"):
            source.commit_time(commit)  # nothing was stored
