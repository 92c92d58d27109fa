"""A webhook receiver for the demo: an HTTP server on loopback, in a thread of the demo process, that
checks each notification's ``X-Hub-Signature-256`` (HMAC-SHA256 of the body with the shared secret)
the way ``docs/notifications.md`` tells a receiver to, and keeps the events it got."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Receiver", "webhook_receiver"]

_MAX_BODY = 1 << 20


@dataclass
class Receiver:
    """Where the receiver listens and what it got: events with a valid signature, and how many
    requests it refused (a missing or wrong signature)."""

    url: str
    secret: bytes
    events: list[str] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self) -> list[str]:
        """The events received with a valid signature, in order."""
        with self.lock:
            return list(self.events)


@contextmanager
def webhook_receiver(secret: bytes) -> Iterator[Receiver]:
    """Serve a receiver on a free 127.0.0.1 port until the block ends."""
    receiver_box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = receiver_box[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, _MAX_BODY))
            want = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
            ok = hmac.compare_digest(want, self.headers.get("X-Hub-Signature-256") or "")
            with receiver.lock:
                if ok:
                    receiver.events.append(str(json.loads(body).get("event")))
                else:
                    receiver.refused += 1
            self.send_response(204 if ok else 401)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver_box.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook", secret))
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver_box[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
