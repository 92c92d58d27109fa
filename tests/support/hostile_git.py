"""A hostile Git mirror on 127.0.0.1 for security tests: crafted packs and a stand-in ``git://`` server.

``HostileGitServer`` speaks just enough of the Git protocol (v0, as ``git daemon`` does when the
client's v2 request is ignored) to serve one branch: it advertises refs, takes the client's wants,
haves and ``done``, answers ``NAK`` and sends a pack over side-band-64k. Its misbehaviours:

* ``pack=``: serve these exact pack bytes (e.g. a zlib bomb from :func:`bomb_pack`);
* ``endless_refs=True``: after the branch, advertise new refs as fast as the socket takes them
  (stopping after ``max_lines`` or when the client hangs up);
* ``drip=<seconds>``: advertise one ref every ``drip`` seconds (at most ``max_lines``).

``HostileHttpServer`` does the same two advertisement misbehaviours over smart HTTP: its
``info/refs`` response never ends (``endless_refs``) or drips (``drip``).

The servers run in a thread, accepts any number of connections (each in its own thread) and is
stopped by ``close()``, which also shuts every client socket; every loop is bounded in lines and
time.

The crafted packs are real packs (valid headers, zlib streams and checksum): a commit whose tree
holds one file ``bomb.bin`` of ``size`` zero bytes, stored as a plain blob (``kind="blob"``), as a
delta of 64 KiB copy instructions over a 64 KiB base (``kind="delta"``), or as ``copies`` separate
copies of the same blob of ``size`` bytes (``kind="copies"``: each object is small, together they
are large). The zlib stream
of ``size`` zeros is built from one full-flushed block repeated, so making a 1 GiB bomb costs only
the SHA-1 of the content.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

__all__ = ["Bomb", "HostileGitServer", "HostileHttpServer", "bomb_pack", "loose_zero_blob"]

MiB = 1024 * 1024
_BLOCK = MiB
_HARD_STOP = 120.0  # seconds: no connection handler runs longer than this


def pkt(data: bytes | None) -> bytes:
    """One pkt-line (None: a flush-pkt)."""
    if data is None:
        return b"0000"
    return b"%04x" % (len(data) + 4) + data


def _zeros_zlib(size: int) -> bytes:
    """A zlib stream inflating to ``size`` zero bytes, built from one repeated full-flushed block."""
    assert size % _BLOCK == 0
    c = zlib.compressobj(9)
    first = c.compress(bytes(_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    header = first[: len(first) - len(block)]
    assert header + block == first
    adler = ((size % 65521) << 16) | 1  # adler32 of n zero bytes: a stays 1, b = n
    return header + block * (size // _BLOCK) + b"\x03\x00" + struct.pack(">I", adler)


def _obj_header(kind: int, size: int) -> bytes:
    out = bytearray()
    byte = (kind << 4) | (size & 0x0F)
    size >>= 4
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _sha(kind: bytes, body: bytes) -> bytes:
    return hashlib.sha1(kind + b" %d\0" % len(body) + body).digest()


@functools.cache
def _zeros_sha(size: int) -> bytes:
    h = hashlib.sha1(b"blob %d\0" % size)
    zeros = bytes(_BLOCK)
    for _ in range(size // _BLOCK):
        h.update(zeros)
    return h.digest()


def loose_zero_blob(size: int) -> tuple[str, bytes]:
    """A loose blob object of ``size`` zero bytes (a multiple of 1 MiB): (hex sha, file content)."""
    assert size % _BLOCK == 0
    assert size >= 2 * _BLOCK
    hdr = b"blob %d\0" % size
    c = zlib.compressobj(9)
    first = c.compress(hdr + bytes(_BLOCK - len(hdr))) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(bytes(_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH) == block
    tail = c.compress(bytes(len(hdr))) + c.flush()
    start = zlib.adler32(hdr)
    a, b = start & 0xFFFF, start >> 16
    adler = (((b + size * a) % 65521) << 16) | a  # appending n zeros: a stays, b grows by n * a
    body = first + block * (size // _BLOCK - 1) + tail[:-4] + struct.pack(">I", adler)
    return _zeros_sha(size).hex(), body


class Bomb:
    """A crafted pack and the commit it carries (see the module docstring)."""

    def __init__(self, pack: bytes, commit: str) -> None:
        self.pack = pack
        self.commit = commit


def bomb_pack(size: int, kind: str = "blob", copies: int = 1) -> Bomb:
    """Return a pack whose commit's tree holds ``bomb.bin``: ``size`` zero bytes (a multiple of 1 MiB)."""
    blob_sha = _zeros_sha(size)
    tree = b"100644 bomb.bin\0" + blob_sha
    tree_sha = _sha(b"tree", tree)
    commit = (b"tree " + tree_sha.hex().encode() + b"\nauthor a <a@example.org> 0 +0000\n"
              b"committer a <a@example.org> 0 +0000\n\nbomb\n")
    commit_sha = _sha(b"commit", commit)
    objects = [_obj_header(1, len(commit)) + zlib.compress(commit),
               _obj_header(2, len(tree)) + zlib.compress(tree)]
    if kind == "blob":
        objects.append(_obj_header(3, size) + _zeros_zlib(size))
    elif kind == "copies":
        objects += [_obj_header(3, size) + _zeros_zlib(size)] * copies
    elif kind == "delta":
        base = bytes(64 * 1024)
        delta = _varint(len(base)) + _varint(size) + b"\x80" * (size // len(base))  # copy 0x10000 from 0
        objects.append(_obj_header(3, len(base)) + zlib.compress(base))
        objects.append(_obj_header(7, len(delta)) + _sha(b"blob", base) + zlib.compress(delta))
    else:
        raise ValueError(kind)
    body = b"PACK" + struct.pack(">II", 2, len(objects)) + b"".join(objects)
    return Bomb(body + hashlib.sha1(body).digest(), commit_sha.hex())


class HostileGitServer:
    """A misbehaving ``git://`` mirror on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, commit: str = "1" * 40, pack: bytes | None = None, endless_refs: bool = False,
                 drip: float | None = None, max_lines: int = 2_000_000, ref_name_bytes: int = 20) -> None:
        self.commit = commit.encode()
        self.pack = pack
        self.endless_refs = endless_refs
        self.drip = drip
        self.max_lines = max_lines
        self.ref_name_bytes = ref_name_bytes
        self.lines_sent = 0
        self._stop = threading.Event()
        self._clients: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, name="hostile-git", daemon=True)
        self._acceptor.start()

    def url(self, repo: str = "fleet.git") -> str:
        """The git:// URL of a repository on this server (every path serves the same)."""
        return f"git://127.0.0.1:{self.port}/{repo}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._clients.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10.0)
        rfile = conn.makefile("rb")
        started = time.monotonic()
        with contextlib.suppress(OSError, ValueError), contextlib.closing(rfile), contextlib.closing(conn):
            self._read_pkt(rfile)  # git-upload-pack /path\0host=...
            caps = b"side-band-64k thin-pack ofs-delta shallow no-progress agent=hostile/1"
            head = pkt(self.commit + b" HEAD\0" + caps + b"\n")
            conn.sendall(head + pkt(self.commit + b" refs/heads/main\n"))
            if self.endless_refs or self.drip is not None:
                self._advertise_more(conn, started)
                return
            conn.sendall(pkt(None))
            while self._read_pkt(rfile) is not None:  # wants, deepen
                pass
            while (line := self._read_pkt(rfile)) != b"done\n":  # haves (and flushes), then done
                if line == b"" or time.monotonic() - started > _HARD_STOP:
                    return
            conn.sendall(pkt(None) + pkt(b"NAK\n"))  # no shallow lines (read by dulwich after done)
            pack = self.pack or b""
            for at in range(0, len(pack), 65515):
                conn.sendall(pkt(b"\x01" + pack[at : at + 65515]))
            conn.sendall(pkt(None))

    def _advertise_more(self, conn: socket.socket, started: float) -> None:
        pad = b"r" * self.ref_name_bytes
        batch = 1 if self.drip is not None else 512
        while (not self._stop.is_set() and self.lines_sent < self.max_lines
               and time.monotonic() - started < _HARD_STOP):
            lines = []
            for _ in range(batch):
                lines.append(pkt(self.commit + b" refs/heads/%s%d\n" % (pad, self.lines_sent)))
                self.lines_sent += 1
            conn.sendall(b"".join(lines))
            if self.drip is not None:
                self._stop.wait(self.drip)

    @staticmethod
    def _read_pkt(rfile: object) -> bytes | None:
        read = rfile.read  # type: ignore[attr-defined]
        size = read(4)
        if len(size) < 4:
            return b""
        n = int(size, 16)
        return None if n < 4 else read(n - 4)

    def close(self) -> None:
        """Stop serving: close the listener and shut every client connection."""
        self._stop.set()
        self._sock.close()
        with self._lock:
            for conn in self._clients:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(2.0)
        for thread in self._threads:
            thread.join(2.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _AdvertisementHandler(BaseHTTPRequestHandler):
    server: _HostileHttp

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        """Answer ``info/refs`` with an advertisement that never ends or drips."""
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        self.send_header("Connection", "close")
        self.end_headers()
        caps = b"side-band-64k thin-pack ofs-delta shallow agent=hostile/1"
        with contextlib.suppress(OSError):
            self.wfile.write(pkt(b"# service=git-upload-pack\n") + pkt(None)
                             + pkt(owner.commit + b" HEAD\0" + caps + b"\n"))
            owner.advertise(self.wfile.write, time.monotonic())


class _HostileHttp(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: HostileHttpServer) -> None:
        super().__init__(("127.0.0.1", 0), _AdvertisementHandler)
        self.owner = owner


class HostileHttpServer:
    """A misbehaving smart-HTTP mirror on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, endless_refs: bool = False, drip: float | None = None, max_lines: int = 2_000_000,
                 ref_name_bytes: int = 20) -> None:
        assert endless_refs or drip is not None
        self.commit = b"1" * 40
        self.drip = drip
        self.max_lines = max_lines
        self.ref_name_bytes = ref_name_bytes
        self.lines_sent = 0
        self._stop = threading.Event()
        self._server = _HostileHttp(self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="hostile-http", daemon=True)
        self._thread.start()

    def url(self, repo: str = "fleet.git") -> str:
        """The http:// URL of a repository on this server."""
        return f"http://127.0.0.1:{self.port}/{repo}"

    def advertise(self, write: object, started: float) -> None:
        """Write ref lines with ``write`` until stopped, at ``max_lines``, or after the hard stop."""
        pad = b"r" * self.ref_name_bytes
        batch = 1 if self.drip is not None else 512
        while (not self._stop.is_set() and self.lines_sent < self.max_lines
               and time.monotonic() - started < _HARD_STOP):
            lines = []
            for _ in range(batch):
                lines.append(pkt(self.commit + b" refs/heads/%s%d\n" % (pad, self.lines_sent)))
                self.lines_sent += 1
            write(b"".join(lines))  # type: ignore[operator]
            if self.drip is not None:
                self._stop.wait(self.drip)

    def close(self) -> None:
        """Stop serving (the writers stop at their next line)."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
