"""Trust-path costs: verifying a signed 500-file manifest, hashing a tree against it, signing,
and opening a sealed secret. Usage: ``python -m bench.bench_trust``.
"""

from __future__ import annotations

import hashlib
import os
import timeit
from datetime import UTC, datetime, timedelta

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from edge_core.trust.keys import format_verify_key
from edge_core.trust.sealed import open_sealed, seal
from edge_core.trust.verify import TrustRoot, check_tree, verify_release
from fleet_server.authoring.manifest import build_release, sign_document


def main() -> int:
    """Print median-free mean timings of the trust operations (many repetitions each)."""
    files = {f"bundles/b/files/f{i}.conf": os.urandom(1000) for i in range(500)}
    now = datetime.now(UTC).replace(microsecond=0)
    keys = [SigningKey.generate() for _ in range(3)]
    signed = build_release(files, version=1, rollback_floor=1, created=now, expires=now + timedelta(days=30))
    doc = sign_document(signed, keys[:2])
    trust = TrustRoot(frozenset(format_verify_key(k.verify_key) for k in keys), 2)
    n = 50
    t = timeit.timeit(lambda: verify_release(doc, trust, now=now, floor=0), number=n) / n
    print(f"verify_release, 500-file manifest ({len(doc)} bytes), 2-of-3 keys: {t * 1000:.2f} ms")
    rel = verify_release(doc, trust, now=now, floor=0)
    t = timeit.timeit(lambda: check_tree(rel, {p: (hashlib.sha256(d).hexdigest(), len(d))
                                               for p, d in files.items()}), number=n) / n
    print(f"hash 500 files (500 KB) and check the tree: {t * 1000:.2f} ms")
    t = timeit.timeit(lambda: sign_document(signed, keys[:2]), number=n) / n
    print(f"sign the manifest with 2 keys: {t * 1000:.2f} ms")
    dev = PrivateKey.generate()
    sealed = seal(b"a secret value", secret_id="x", version=1, recipients=[dev.public_key])
    t = timeit.timeit(lambda: open_sealed(sealed, expected_id="x", key=dev), number=200) / 200
    print(f"open a sealed secret: {t * 1000:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
