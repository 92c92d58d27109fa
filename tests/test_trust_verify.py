"""The pure release verifier: signatures, thresholds, expiry, rollback, structure and tree checks."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from nacl.signing import SigningKey

from edge_core.errors import (
    ConfigError,
    ExpiredError,
    FileHashMismatch,
    FileMissing,
    ManifestError,
    ManifestTooLarge,
    PathError,
    RollbackError,
    ThresholdError,
    UnlistedFile,
    UntrustedKeyError,
)
from edge_core.trust.canonical import canonical_bytes
from edge_core.trust.keys import format_verify_key
from edge_core.trust.manifest import MANIFEST_PATH, file_digest
from edge_core.trust.verify import TrustRoot, VerifiedRelease, check_file, check_tree, verify_release
from fleet_server.authoring.manifest import build_release, sign_document

NOW = datetime(2030, 6, 1, 8, 0, 0, tzinfo=UTC)
FILES = {
    "fleet.yaml": b"reconcile_interval: 60\n",
    "bundles/web/bundle.yaml": b"name: web\n",
    "bundles/web/nginx.conf": b"server {}\n",
}
KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 5)]
PUB = [format_verify_key(k.verify_key) for k in KEYS]


def _doc(keys: list[SigningKey], *, version: int = 5, floor: int = 3,
         expires: datetime = NOW + timedelta(days=1), files: dict[str, bytes] = FILES) -> bytes:
    signed = build_release(files, version=version, rollback_floor=floor, created=NOW - timedelta(hours=1),
                           expires=expires, message="test")
    return sign_document(signed, keys)


def _trust(n: int = 1, threshold: int = 1) -> TrustRoot:
    return TrustRoot(frozenset(PUB[:n]), threshold)


def _tree(files: dict[str, bytes]) -> dict[str, tuple[str, int]]:
    return {p: file_digest(d) for p, d in files.items()}


def _edit(document: bytes, change: object) -> bytes:
    """Apply ``change`` to the parsed document and re-serialise it, keeping the old signatures."""
    doc = json.loads(document)
    change(doc)  # type: ignore[operator]
    return canonical_bytes(doc)


def test_valid_release_is_accepted_with_its_contents() -> None:
    release = verify_release(_doc([KEYS[0]]), _trust(), now=NOW, floor=0)
    assert isinstance(release, VerifiedRelease)
    assert (release.version, release.rollback_floor, release.message) == (5, 3, "test")
    assert release.signers == frozenset({PUB[0]})
    assert release.expires == NOW + timedelta(days=1)
    assert release.files["fleet.yaml"].sha256 == file_digest(FILES["fleet.yaml"])[0]
    assert set(release.files) == set(FILES)


def test_signature_by_untrusted_key_is_refused() -> None:
    with pytest.raises(UntrustedKeyError):
        verify_release(_doc([KEYS[3]]), _trust(2), now=NOW, floor=0)


def test_unsigned_release_is_refused() -> None:
    doc = _edit(_doc([KEYS[0]]), lambda d: d.update(signatures=[]))
    with pytest.raises(UntrustedKeyError):
        verify_release(doc, _trust(), now=NOW, floor=0)


def test_tampered_signed_part_invalidates_signature() -> None:
    doc = _edit(_doc([KEYS[0]]), lambda d: d["signed"].update(version=99))
    with pytest.raises(UntrustedKeyError):
        verify_release(doc, _trust(), now=NOW, floor=0)


def test_tampered_file_digest_invalidates_signature() -> None:
    def change(d: dict[str, dict[str, dict[str, dict[str, object]]]]) -> None:
        d["signed"]["files"]["fleet.yaml"]["sha256"] = "00" * 32

    with pytest.raises(UntrustedKeyError):
        verify_release(_edit(_doc([KEYS[0]]), change), _trust(), now=NOW, floor=0)


def test_below_threshold_is_refused() -> None:
    with pytest.raises(ThresholdError):
        verify_release(_doc([KEYS[0]]), _trust(3, threshold=2), now=NOW, floor=0)


def test_threshold_met_by_distinct_trusted_keys() -> None:
    release = verify_release(_doc(KEYS[:2]), _trust(3, threshold=2), now=NOW, floor=0)
    assert release.signers == frozenset(PUB[:2])


def test_untrusted_signatures_do_not_count_towards_threshold() -> None:
    with pytest.raises(ThresholdError):
        verify_release(_doc([KEYS[0], KEYS[3]]), _trust(3, threshold=2), now=NOW, floor=0)


def test_duplicate_signatures_by_one_key_count_once() -> None:
    doc = _edit(_doc([KEYS[0]]), lambda d: d["signatures"].extend([d["signatures"][0]] * 3))
    with pytest.raises(ThresholdError):
        verify_release(doc, _trust(2, threshold=2), now=NOW, floor=0)


def test_invalid_signature_is_ignored_not_counted() -> None:
    good = json.loads(_doc(KEYS[:2]))
    bad_sig = {"keyid": PUB[2], "sig": good["signatures"][0]["sig"]}
    doc = _edit(_doc(KEYS[:2]), lambda d: d["signatures"].append(bad_sig))
    assert verify_release(doc, _trust(3, threshold=2), now=NOW, floor=0).signers == frozenset(PUB[:2])
    with pytest.raises(ThresholdError):
        verify_release(doc, _trust(3, threshold=3), now=NOW, floor=0)


def test_garbage_signature_text_is_ignored() -> None:
    doc = _edit(_doc([KEYS[0]]), lambda d: d["signatures"].append({"keyid": "ed25519:!!", "sig": "%%"}))
    assert verify_release(doc, _trust(), now=NOW, floor=0).signers == frozenset({PUB[0]})


def test_expired_release_is_refused_at_and_after_expiry() -> None:
    doc = _doc([KEYS[0]], expires=NOW)
    with pytest.raises(ExpiredError):
        verify_release(doc, _trust(), now=NOW, floor=0)
    with pytest.raises(ExpiredError):
        verify_release(doc, _trust(), now=NOW + timedelta(days=400), floor=0)
    assert verify_release(doc, _trust(), now=NOW - timedelta(seconds=1), floor=0).version == 5


def test_version_below_rollback_floor_is_refused() -> None:
    with pytest.raises(RollbackError):
        verify_release(_doc([KEYS[0]], version=5, floor=2), _trust(), now=NOW, floor=6)


def test_rollback_at_or_above_floor_is_accepted() -> None:
    older = _doc([KEYS[0]], version=4, floor=2)
    # The device has installed version 6 and verified floor 4: going back to 4 is how a canary is undone.
    assert verify_release(older, _trust(), now=NOW, floor=4).version == 4
    assert verify_release(older, _trust(), now=NOW, floor=3).version == 4


def test_floor_above_version_is_refused() -> None:
    doc = _edit(_doc([KEYS[0]]), lambda d: d["signed"].update(rollback_floor=9))
    with pytest.raises(ManifestError, match="rollback_floor"):
        verify_release(doc, _trust(), now=NOW, floor=0)


def test_checks_run_in_order_structure_before_signature() -> None:
    doc = _edit(_doc([KEYS[3]]), lambda d: d["signed"].update(surprise=True))
    with pytest.raises(ManifestError, match="surprise"):
        verify_release(doc, _trust(), now=NOW, floor=0)


def test_checks_run_in_order_signature_before_expiry_and_rollback() -> None:
    doc = _doc([KEYS[3]], expires=NOW - timedelta(seconds=1), version=1, floor=1)
    with pytest.raises(UntrustedKeyError):
        verify_release(doc, _trust(), now=NOW, floor=5)


def test_checks_run_in_order_expiry_before_rollback() -> None:
    doc = _doc([KEYS[0]], expires=NOW, version=1, floor=1)
    with pytest.raises(ExpiredError):
        verify_release(doc, _trust(), now=NOW, floor=5)


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"not json",
        b"{\"signed\": {}, \"signatures\": []",
        b"[]",
        b"{\"signed\": {}}",
        b"{\"signed\": 1.5, \"signatures\": []}",
        b"{\"signed\": {}, \"signatures\": [\"x\"]}",
        b"\xff\xfe",
    ],
)
def test_malformed_manifest_is_refused(document: bytes) -> None:
    with pytest.raises(ManifestError):
        verify_release(document, _trust(), now=NOW, floor=0)


def test_truncated_manifest_is_refused() -> None:
    doc = _doc([KEYS[0]])
    for cut in (1, len(doc) // 2, len(doc) - 1):
        with pytest.raises(ManifestError):
            verify_release(doc[:cut], _trust(), now=NOW, floor=0)


def test_manifest_over_size_cap_is_refused_before_parsing() -> None:
    doc = _doc([KEYS[0]])
    with pytest.raises(ManifestTooLarge):
        verify_release(doc, _trust(), now=NOW, floor=0, max_bytes=len(doc) - 1)
    with pytest.raises(ManifestTooLarge):
        verify_release(b"{" * 100, _trust(), now=NOW, floor=0, max_bytes=99)
    assert verify_release(doc, _trust(), now=NOW, floor=0, max_bytes=len(doc)).version == 5


def test_duplicate_json_keys_are_refused() -> None:
    doc = _doc([KEYS[0]])
    text = doc.decode()
    duplicated = text.replace('"version":5', '"version":5,"version":9', 1).encode()
    assert duplicated != doc
    with pytest.raises(ManifestError, match="duplicate"):
        verify_release(duplicated, _trust(), now=NOW, floor=0)


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a\x00b", "bundles/../../etc/passwd"])
def test_path_traversal_in_file_list_is_refused(bad: str) -> None:
    entry = {"sha256": "00" * 32, "size": 1}
    signed = json.loads(_doc([KEYS[0]]))["signed"]
    signed["files"][bad] = entry
    # Signed properly by a trusted key: the path check must refuse it anyway.
    doc = sign_document(signed, [KEYS[0]])
    with pytest.raises(PathError):
        verify_release(doc, _trust(), now=NOW, floor=0)


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_release(_doc([KEYS[0]]), _trust(), now=datetime(2030, 1, 1), floor=0)


@pytest.mark.parametrize(
    ("keys", "threshold"),
    [(frozenset(), 1), (frozenset(PUB[:2]), 3), (frozenset(PUB[:2]), 0), (frozenset({"ed25519:abc"}), 1),
     (frozenset({PUB[0].replace("ed25519:", "ed25519: ")}), 1)],
)
def test_trust_root_is_validated_on_construction(keys: frozenset[str], threshold: int) -> None:
    with pytest.raises(ConfigError):
        TrustRoot(keys, threshold)


# --- tree and file checks -------------------------------------------------------------------------

def _verified() -> VerifiedRelease:
    return verify_release(_doc([KEYS[0]]), _trust(), now=NOW, floor=0)


def test_matching_tree_passes_and_manifest_entry_is_ignored() -> None:
    tree = _tree(FILES)
    check_tree(_verified(), tree)
    tree[MANIFEST_PATH] = file_digest(b"{}")
    check_tree(_verified(), tree)


def test_tampered_file_content_is_refused() -> None:
    changed = dict(FILES, **{"bundles/web/nginx.conf": b"server { evil }\n"})
    with pytest.raises(FileHashMismatch, match=re.escape("bundles/web/nginx.conf")):
        check_tree(_verified(), _tree(changed))


def test_same_digest_different_size_is_refused() -> None:
    tree = _tree(FILES)
    sha, size = tree["fleet.yaml"]
    tree["fleet.yaml"] = (sha, size + 1)
    with pytest.raises(FileHashMismatch, match=re.escape("fleet.yaml")):
        check_tree(_verified(), tree)


def test_file_added_after_signing_is_refused() -> None:
    added = dict(FILES, **{"bundles/extra.yaml": b"x"})
    with pytest.raises(UnlistedFile, match=re.escape("bundles/extra.yaml")):
        check_tree(_verified(), _tree(added))


def test_file_removed_after_signing_is_refused() -> None:
    removed = {p: d for p, d in FILES.items() if p != "fleet.yaml"}
    with pytest.raises(FileMissing, match=re.escape("fleet.yaml")):
        check_tree(_verified(), _tree(removed))


def test_check_file() -> None:
    release = _verified()
    check_file(release, "fleet.yaml", FILES["fleet.yaml"])
    with pytest.raises(FileHashMismatch, match=re.escape("fleet.yaml")):
        check_file(release, "fleet.yaml", FILES["fleet.yaml"] + b"#")
    with pytest.raises(UnlistedFile, match=re.escape("nope.yaml")):
        check_file(release, "nope.yaml", b"")


def test_verified_release_files_cannot_be_changed() -> None:
    release = _verified()
    with pytest.raises(TypeError):
        release.files["fleet.yaml"] = release.files["fleet.yaml"]  # type: ignore[index]
