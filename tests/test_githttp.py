"""The smart-HTTP transport (``edge_core.githttp``) against real servers on 127.0.0.1: TLS verified
against the trust store, credentials kept to the mirror's own origin across a redirect, no
downgrade from https to http, proxies from the environment (a ``CONNECT`` tunnel for https), and
no urllib3 in the process."""

from __future__ import annotations

import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_core.errors import FetchError
from edge_core.source import Source, SourceAuth
from edge_core.tls import client_context
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.httpfront import ForwardProxy, Redirector
from tests.support.mirror import SmartHttpMirror
from tests.support.tls import Certificates, hashed_store, make_ca

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class World:
    mirrors: Path
    head: str
    certs: Certificates
    other: Certificates  # a CA that signed nothing the mirror presents


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("githttp")
    mirrors = base / "mirrors"
    bare = make_bare(mirrors / "fleet.git")
    head = WorkRepo.create(base / "work").commit_and_push(bare, {"fleet.yaml": "description: http\n"}, "one")
    return World(mirrors, head, make_ca(base / "ca"), make_ca(base / "other", "another CA"))


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without proxies from the machine's environment."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def fetch(url: str, cache: Path, **kwargs: object) -> str:
    with Source(url, "main", cache, **kwargs) as source:  # type: ignore[arg-type]
        return source.fetch().commit


def test_https_is_verified_against_the_trust_store(world: World, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with SmartHttpMirror(world.mirrors, tls=world.certs.server_context()) as mirror:
        url = mirror.url("fleet.git")
        assert url.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(world.certs.ca))
        assert fetch(url, tmp_path / "trusted") == world.head
        monkeypatch.setenv("SSL_CERT_FILE", str(world.other.ca))
        untrusted = "mirror certificate not trusted: certificate verify failed: unable to get local issuer"
        with pytest.raises(FetchError, match=untrusted) as refused:
            fetch(url, tmp_path / "untrusted")
        assert f"127.0.0.1:{mirror.port}" in str(refused.value)
    # https:// to a server that does not speak TLS
    with SmartHttpMirror(world.mirrors) as plain, pytest.raises(FetchError, match="mirror TLS failed: "):
        fetch(plain.url("fleet.git").replace("http://", "https://"), tmp_path / "not-tls")


def test_the_trust_store_is_read_on_demand(world: World, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA is parsed until a handshake needs one (Debian's bundle is 144 certificates)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_store(tmp_path / "certs", world.other.ca, world.certs.ca)))
    ctx = client_context()
    assert ctx.cert_store_stats()["x509"] == 0
    assert (ctx.verify_mode, ctx.check_hostname, ctx.minimum_version) == (
        ssl.CERT_REQUIRED, True, ssl.TLSVersion.TLSv1_2)
    with SmartHttpMirror(world.mirrors, tls=world.certs.server_context()) as mirror:
        assert fetch(mirror.url("fleet.git"), tmp_path / "cache") == world.head
    # a directory without hashed names: the whole default bundle, as OpenSSL does by default
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert client_context().cert_store_stats()["x509"] > 0
    # a CA file given: that file only
    assert client_context(str(world.certs.ca)).cert_store_stats()["x509"] == 1


def test_a_redirect_is_followed_and_the_credentials_stay_with_their_origin(world: World,
                                                                          tmp_path: Path) -> None:
    with SmartHttpMirror(world.mirrors) as mirror, \
            Redirector(f"http://127.0.0.1:{mirror.port}") as front:
        head = fetch(front.url("fleet.git"), tmp_path / "cache", auth=SourceAuth(token="front-token"))
        assert head == world.head
        # the mirror's own origin got the token; the other origin, where it was sent, did not
        assert [(m, auth is not None) for m, _p, auth in front.seen] == [("GET", True)]
        assert front.seen[0][1].startswith("/fleet.git/info/refs")
        assert mirror.requests >= 2
        assert mirror.authorization == [None] * mirror.requests


def test_a_redirect_from_https_to_http_is_refused(world: World, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(world.certs.ca))
    with SmartHttpMirror(world.mirrors) as mirror, \
            Redirector(f"http://127.0.0.1:{mirror.port}", tls=world.certs.server_context()) as front:
        with pytest.raises(FetchError, match="redirect from https to http refused"):
            fetch(front.url("fleet.git"), tmp_path / "cache", auth=SourceAuth(token="front-token"))
        assert mirror.requests == 0


def test_proxies_come_from_the_environment(world: World, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(world.certs.ca))
    with SmartHttpMirror(world.mirrors) as plain, \
            SmartHttpMirror(world.mirrors, tls=world.certs.server_context()) as tls, \
            ForwardProxy() as proxy:
        proxied = proxy.url.replace("http://", "http://ops:proxy-pass@")
        monkeypatch.setenv("http_proxy", proxied)
        monkeypatch.setenv("https_proxy", proxied)
        # plain http: absolute URIs to the proxy, with the proxy's credentials
        assert fetch(plain.url("fleet.git"), tmp_path / "plain") == world.head
        methods = [(m, target.split("?")[0]) for m, target, _a in proxy.seen]
        base = f"http://127.0.0.1:{plain.port}/fleet.git"
        assert methods[0] == ("GET", f"{base}/info/refs")
        assert set(methods[1:]) == {("POST", f"{base}/git-upload-pack")}  # ls-refs and fetch (v2)
        assert {a for _m, _t, a in proxy.seen} == {"Basic b3BzOnByb3h5LXBhc3M="}
        # https: a CONNECT tunnel, the mirror's certificate still verified end to end
        proxy.seen.clear()
        assert fetch(tls.url("fleet.git"), tmp_path / "tls") == world.head
        assert {(m, t) for m, t, _a in proxy.seen} == {("CONNECT", f"127.0.0.1:{tls.port}")}
        # no_proxy: straight to the mirror
        proxy.seen.clear()
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert fetch(plain.url("fleet.git"), tmp_path / "direct") == world.head
        assert proxy.seen == []


def test_an_http_fetch_loads_no_urllib3(world: World, tmp_path: Path) -> None:
    with SmartHttpMirror(world.mirrors) as mirror:
        code = ("import sys\nfrom pathlib import Path\nfrom edge_core.source import Source\n"
                f"with Source({mirror.url('fleet.git')!r}, 'main', Path({str(tmp_path / 'c')!r})) as s:\n"
                "    print(s.fetch().commit, 'urllib3' in sys.modules)\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [world.head, "False"]
