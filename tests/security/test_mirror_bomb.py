"""A hostile mirror serves zlib and delta bombs: the fetch is refused from the pack's object headers
before anything is inflated whole, memory stays bounded, and the cache and the device are unchanged.

The fetching side runs in a child process under ``RLIMIT_AS`` (512 MiB), so a regression fails by
``MemoryError`` instead of eating the machine. Before the fix the 1 GiB blob inflated whole (2.1 GB
without a limit; ``MemoryError`` with it) and the delta's 1 GiB result was allocated at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dulwich.objects import Commit, Tree
from dulwich.repo import Repo

from edge_agent.agent import status, sync_once
from tests.support.agent_fleet import AgentFleet, bundle, snapshot
from tests.support.fetch_child import run_child
from tests.support.hostile_git import HostileGitServer, bomb_pack, loose_zero_blob
from tests.support.package_spec import agent_dropped_extensions

GIB = 1 << 30
MIB = 1 << 20
LIMIT_MIB = 512  # the child's address space: a 1 GiB object cannot be held whole
RSS_BOUND_KIB = 256 * 1024  # normal footprint (~30 MiB) plus the default caps' working set, with room


def _cache_state(cache: Path) -> tuple[list[str], dict[str, str]]:
    packs = sorted(p.name for p in (cache / "objects" / "pack").glob("*"))
    refs = {str(p.relative_to(cache)): p.read_text() for p in (cache / "refs").rglob("*") if p.is_file()}
    return packs, refs


@pytest.mark.parametrize("packaged", [False, True], ids=["dulwich-compiled", "as-packaged"])
@pytest.mark.parametrize(("kind", "what"), [("blob", "object of 1073741824 bytes"),
                                            ("delta", "delta result of 1073741824 bytes")])
def test_bomb_is_refused_before_inflating(tmp_path: Path, kind: str, what: str, packaged: bool) -> None:
    # as packaged: without the compiled modules the agent package leaves out (dulwich's own Python)
    bomb = bomb_pack(GIB, kind)
    assert len(bomb.pack) < 2 * MIB  # a small pack on the wire
    cache = tmp_path / "cache"
    dropped = list(agent_dropped_extensions())
    with HostileGitServer(commit=bomb.commit, pack=bomb.pack) as mirror:
        got = run_child({"mode": "fetch", "url": mirror.url(), "cache": str(cache), "limit_mib": LIMIT_MIB,
                         "without": dropped if packaged else [], "watch": dropped})
    assert (got["loaded"] == []) is packaged
    print(f"{kind} bomb: {got}")
    assert got["error"] == "FetchError"
    assert got["reason"].startswith(f"{what} exceeds repo.max_object_bytes (16777216)")
    assert got["peak_rss_kib"] < RSS_BOUND_KIB
    assert _cache_state(cache) == ([], {})  # nothing was stored


def test_many_small_objects_hit_the_total_inflated_cap(tmp_path: Path) -> None:
    # 24 objects of 8 MiB each: every one under max_object_bytes, together over max_inflated_bytes.
    bomb = bomb_pack(8 * MIB, "copies", copies=24)
    with HostileGitServer(commit=bomb.commit, pack=bomb.pack) as mirror:
        got = run_child({"mode": "fetch", "url": mirror.url(), "cache": str(tmp_path / "cache"),
                         "limit_mib": LIMIT_MIB, "limits": {"max_inflated_bytes": 128 * MIB}})
    assert got["error"] == "FetchError"
    assert "exceeds repo.max_inflated_bytes (134217728)" in got["reason"]


def test_agent_sync_against_a_bomb_leaves_the_device_as_it_was(fleet: AgentFleet) -> None:
    fleet.publish({"bundles/app/bundle.yaml": bundle([
        {"kind": "file", "path": "/etc/app/app.conf", "content": "release = 1\n"}])})
    first = sync_once(fleet.config)
    assert first.outcome == "applied"
    root_before = snapshot(fleet.root)
    cache_before = _cache_state(fleet.state_dir / "repo")
    bomb = bomb_pack(GIB, "blob")
    with HostileGitServer(commit=bomb.commit, pack=bomb.pack) as mirror:
        data = yaml.safe_load(fleet.config_path.read_text())
        data["repo"]["url"] = mirror.url()
        fleet.config_path.write_text(yaml.safe_dump(data))
        got = run_child({"mode": "sync", "config": str(fleet.config_path), "limit_mib": LIMIT_MIB,
                         "without": list(agent_dropped_extensions()),  # as the package runs it
                         "watch": list(agent_dropped_extensions())})
    print(f"agent sync against a 1 GiB blob bomb: {got}")
    assert got["loaded"] == []
    assert got["outcome"] == "fetch_failed"
    assert "exceeds repo.max_object_bytes" in got["reason"]
    assert got["peak_rss_kib"] < RSS_BOUND_KIB
    assert snapshot(fleet.root) == root_before
    assert _cache_state(fleet.state_dir / "repo") == cache_before
    assert status(fleet.config)["installed"]["commit"] == first.commit


def test_read_tree_refuses_an_oversized_blob_from_its_header(tmp_path: Path) -> None:
    # A cache that already holds a 1 GiB blob (stored before the caps existed, or under larger
    # ones): reading the tree refuses the file from its object header instead of inflating it.
    cache = tmp_path / "cache"
    repo = Repo.init_bare(str(cache), mkdir=True)
    sha, body = loose_zero_blob(GIB)
    (cache / "objects" / sha[:2]).mkdir(parents=True, exist_ok=True)
    (cache / "objects" / sha[:2] / sha[2:]).write_bytes(body)
    tree = Tree()
    tree.add(b"bomb.bin", 0o100644, sha.encode())
    commit = Commit()
    commit.tree = tree.id
    commit.author = commit.committer = b"Test Operator <operator@example.invalid>"
    commit.author_time = commit.commit_time = 0
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = b"big\n"
    repo.object_store.add_object(tree)
    repo.object_store.add_object(commit)
    repo.close()
    got = run_child({"mode": "read_tree", "cache": str(cache), "commit": commit.id.decode(),
                     "limit_mib": LIMIT_MIB})
    print(f"read_tree of a cached 1 GiB blob: {got}")
    assert got["error"] == "FileIntegrityError"
    assert got["reason"] == "bomb.bin is 1073741824 bytes, over the 16777216 limit"
    assert got["peak_rss_kib"] < RSS_BOUND_KIB
