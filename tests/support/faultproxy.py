"""A TCP proxy on loopback that injects network faults between a client and a real server.

    with GitDaemon(root) as daemon, FaultProxy("127.0.0.1", daemon.port) as proxy:
        url = f"git://127.0.0.1:{proxy.port}/fleet.git"
        proxy.blackhole()          # the next connections are accepted and never answered
        ...
        proxy.pass_through()       # and from now on they reach the server again

Modes (each takes effect for connections accepted after the switch; a connection keeps the mode
it was accepted in, so a test knows exactly what each fetch met):

* ``pass_through()``: relay both ways unchanged.
* ``drop()``: accept, then close at once (an orderly FIN, before any byte).
* ``reset()``: accept, then abort with a TCP RST (``SO_LINGER`` 0).
* ``blackhole()``: accept and never answer, reading and discarding what the client sends
  (a half-open peer, as behind a dead NAT or firewall).
* ``delay(seconds)``: wait ``seconds`` before connecting to the server, then relay.
* ``truncate_after(n)``: relay, but pass only the first ``n`` bytes from the server, then close
  both sides.
* ``corrupt(offset)``: relay, flipping every bit of the byte at ``offset`` of the server's stream.

``connections`` counts accepted connections; ``server_streams`` keeps (bounded) what the server sent
on recent connections before any fault was applied, so a test can check where its fault landed
(after ``wait_idle()``: a connection's stream is kept when the proxy has finished it).
Everything is bounded: the accept loop and every relay poll a stop flag every 50 ms, sockets carry
timeouts, and ``stop()`` closes every socket and joins every thread. No process is started.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["Fault", "FaultProxy"]

_POLL = 0.05
_CHUNK = 64 * 1024
_KEPT_STREAMS = 8


@dataclass(frozen=True)
class Fault:
    """One proxy mode.

    Attributes:
        kind: ``pass``, ``drop``, ``reset``, ``blackhole``, ``delay``, ``truncate`` or ``corrupt``.
        seconds: the wait for ``delay``.
        limit: the server bytes passed for ``truncate``.
        offset: the server byte flipped for ``corrupt``.
    """

    kind: str = "pass"
    seconds: float = 0.0
    limit: int = 0
    offset: int = 0


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 (a free port) in front of ``target_host:target_port``.

    Args:
        target_host: the server's address.
        target_port: the server's port.
        io_timeout: seconds a connect to the server or a send to either side may take.
        record_limit: how many server bytes per connection ``server_streams`` keeps.
    """

    def __init__(self, target_host: str, target_port: int, *, io_timeout: float = 10.0,
                 record_limit: int = 1024 * 1024) -> None:
        self.target = (target_host, target_port)
        self.io_timeout = io_timeout
        self.record_limit = record_limit
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._fault = Fault()
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._streams: deque[bytes] = deque(maxlen=_KEPT_STREAMS)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0

    # -- modes -----------------------------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        """The mode new connections get."""
        with self._lock:
            return self._fault

    def set_fault(self, fault: Fault) -> None:
        """Switch the mode for connections accepted from now on.

        Raises:
            ValueError: an unknown kind or a negative parameter.
        """
        if fault.kind not in ("pass", "drop", "reset", "blackhole", "delay", "truncate", "corrupt"):
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if fault.seconds < 0 or fault.limit < 0 or fault.offset < 0:
            raise ValueError(f"fault parameters must not be negative: {fault}")
        with self._lock:
            self._fault = fault

    def pass_through(self) -> None:
        """Relay new connections unchanged."""
        self.set_fault(Fault("pass"))

    def drop(self) -> None:
        """Accept new connections and close them at once."""
        self.set_fault(Fault("drop"))

    def reset(self) -> None:
        """Accept new connections and abort them with a TCP reset."""
        self.set_fault(Fault("reset"))

    def blackhole(self) -> None:
        """Accept new connections and never answer them."""
        self.set_fault(Fault("blackhole"))

    def delay(self, seconds: float) -> None:
        """Hold new connections ``seconds`` before connecting them to the server."""
        self.set_fault(Fault("delay", seconds=seconds))

    def truncate_after(self, n: int) -> None:
        """Pass only the first ``n`` bytes the server sends on new connections, then close."""
        self.set_fault(Fault("truncate", limit=n))

    def corrupt(self, offset: int) -> None:
        """Flip the byte at ``offset`` of what the server sends on new connections."""
        self.set_fault(Fault("corrupt", offset=offset))

    # -- observation -----------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """How many client connections the proxy has accepted."""
        with self._lock:
            return self._connections

    @property
    def server_streams(self) -> list[bytes]:
        """What the server sent on the most recent relayed connections (oldest first, each capped)."""
        with self._lock:
            return list(self._streams)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every accepted connection has ended; return False if some still run after ``timeout``.

        A client may give up before the proxy has seen its connection close; call this before
        reading ``server_streams`` for the connection just used.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 (a free port, or the previous one) and accept in a background thread."""
        if self._listener is not None:
            return
        self._stopping.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(_POLL)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, args=(listener,),
                                          name=f"faultproxy-{self.port}", daemon=True)
        self._acceptor.start()

    def stop(self) -> None:
        """Stop accepting, close every connection and join every thread (bounded)."""
        listener, acceptor = self._listener, self._acceptor
        self._listener = self._acceptor = None
        self._stopping.set()
        if listener is not None:
            listener.close()
        if acceptor is not None:
            acceptor.join(timeout=5)
        # Every connection thread polls the stop flag and closes its own sockets; a send in flight
        # is bounded by io_timeout. Whatever is still open after that is closed here.
        with self._lock:
            threads, self._threads = list(self._threads), []
        for thread in threads:
            thread.join(timeout=self.io_timeout + 1)
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(self.io_timeout)
            with self._lock:
                self._connections += 1
                fault = self._fault
                self._sockets.add(client)
                thread = threading.Thread(target=self._serve, args=(client, fault),
                                          name=f"faultproxy-{self.port}-conn", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, fault: Fault) -> None:
        upstream: socket.socket | None = None
        try:
            if fault.kind == "drop":
                return
            if fault.kind == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if fault.kind == "blackhole":
                self._swallow(client)
                return
            if fault.kind == "delay" and self._stopping.wait(fault.seconds):
                return
            upstream = socket.create_connection(self.target, timeout=self.io_timeout)
            with self._lock:
                self._sockets.add(upstream)
            self._relay(client, upstream, fault)
        except (OSError, ValueError):  # ValueError: a socket closed under select() by stop()
            return
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._lock:
                        self._sockets.discard(sock)
                    _close(sock)

    def _swallow(self, client: socket.socket) -> None:
        """Read and discard until the client closes or the proxy stops; never send a byte."""
        while not self._stopping.is_set():
            readable, _, _ = select.select([client], [], [], _POLL)
            if readable and not client.recv(_CHUNK):
                return

    def _relay(self, client: socket.socket, upstream: socket.socket, fault: Fault) -> None:
        """Copy bytes both ways until both sides have finished, applying ``fault`` to the server side."""
        open_from = {client, upstream}
        sent_by_server = 0
        record = bytearray()
        try:
            while open_from and not self._stopping.is_set():
                readable, _, _ = select.select(list(open_from), [], [], _POLL)
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    other = upstream if sock is client else client
                    if not data:
                        open_from.discard(sock)
                        with contextlib.suppress(OSError):
                            other.shutdown(socket.SHUT_WR)
                        continue
                    if sock is client:
                        upstream.sendall(data)
                        continue
                    if len(record) < self.record_limit:
                        record += data[: self.record_limit - len(record)]
                    start, sent_by_server = sent_by_server, sent_by_server + len(data)
                    if fault.kind == "corrupt" and start <= fault.offset < sent_by_server:
                        at = fault.offset - start
                        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                    if fault.kind == "truncate" and sent_by_server >= fault.limit:
                        client.sendall(data[: max(0, fault.limit - start)])
                        client.shutdown(socket.SHUT_WR)  # an orderly end of stream, not a reset
                        return
                    client.sendall(data)
        finally:
            with self._lock:
                self._streams.append(bytes(record))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
