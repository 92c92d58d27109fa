"""The HTTP server refuses before it reads: token checks and a body cap in front of every route.

:class:`RequestGuard` is a pure ASGI middleware placed before FastAPI. For each HTTP request it

1. finds the route that will answer it; when that route changes state (``POST``, ``PUT``, ``PATCH``,
   ``DELETE``) it checks the admin token from the ``Authorization`` header *before* a byte of the
   body is read, exactly as the route itself would (:func:`fleet_server.api.auth.require_admin`).
   The Git webhook may instead carry ``X-Hub-Signature-256``: then only its presence (and a
   configured webhook secret) is checked here, and the route verifies the HMAC over the capped body;
2. refuses with 413 a ``Content-Length`` over the cap at once, and counts the bytes of a streamed
   (chunked) body, stopping at the cap with 413 without reading further;
3. answers 408 when a body that is being read stalls longer than ``body_timeout`` seconds between
   two pieces (a slow-body client cannot hold a request open for ever; uvicorn itself has no such
   limit).

Requests that match no route, or only with another method, pass through untouched (404 and 405
read no body). Every refusal is the API's JSON shape ``{"error": "<reason>"}`` and carries
``Connection: close``: uvicorn would otherwise read and discard the rest of an unread body to keep
the connection alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_server.api.auth import Tokens, require_admin

__all__ = ["STATE_CHANGING_METHODS", "BodyStalled", "BodyTooLarge", "RequestGuard",
           "webhook_precheck"]

log = logging.getLogger(__name__)

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_CLOSE = {"Connection": "close"}
"""Sent with every refusal: the server closes the connection instead of draining an unread body."""


class BodyTooLarge(StarletteHTTPException):
    """A request body grew past its cap while it was being read (answered 413)."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(413, f"{what} over {limit} bytes", headers=dict(_CLOSE))


class BodyStalled(StarletteHTTPException):
    """No piece of a request body arrived within the body timeout (answered 408)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"request body stalled for more than {timeout:g}s", headers=dict(_CLOSE))


def webhook_precheck(tokens: Tokens, headers: Headers) -> None:
    """Refuse a webhook call whose credentials can be judged without its body.

    A call with ``X-Hub-Signature-256`` passes when a webhook secret is configured (the route checks
    the HMAC over the body); any other call needs the admin token, as the route itself demands.

    Raises:
        HTTPException: 401 without credentials, 403 with wrong ones or no configured secret.
    """
    signature = headers.get("x-hub-signature-256")
    authorization = headers.get("authorization")
    if signature is not None:
        if tokens.webhook is None:
            raise HTTPException(403, "webhook signatures are not accepted: no webhook secret is configured")
        return
    if authorization is None and tokens.webhook is not None:
        raise HTTPException(401, "X-Hub-Signature-256 or an admin token required",
                            headers={"WWW-Authenticate": "Bearer"})
    require_admin(tokens, authorization)


def _refusal(exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                        headers={**(exc.headers or {}), **_CLOSE})


class RequestGuard:
    """ASGI middleware: admin token before the body of state-changing routes, and a body-size cap.

    Args:
        app: the application behind the guard.
        routes: a callable returning every route of the application as a flat sequence (read at
            request time); entries that are not plain routes (mounts, included routers) are skipped,
            so the routes of included routers must be listed themselves.
        tokens: the API's secrets.
        max_body_bytes: the cap on every request body.
        webhook_path: the path of the Git webhook, whose signature is checked by its route.
        webhook_max_bytes: the webhook's own cap (at most ``max_body_bytes`` is enforced).
        body_timeout: longest wait, in seconds, for the next piece of a body still being sent.
    """

    def __init__(self, app: ASGIApp, *, routes: Callable[[], Sequence[BaseRoute]], tokens: Tokens,
                 max_body_bytes: int, webhook_path: str, webhook_max_bytes: int,
                 body_timeout: float) -> None:
        self.app = app
        self.routes = routes
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.webhook_path = webhook_path
        self.webhook_max_bytes = min(webhook_max_bytes, max_body_bytes)
        self.body_timeout = body_timeout

    def _matched(self, scope: Scope) -> Route | None:
        for route in self.routes():
            if isinstance(route, Route) and route.matches(scope)[0] == Match.FULL:
                return route
        return None

    def _check(self, scope: Scope, headers: Headers) -> tuple[int, str]:
        """Raise for refused credentials; return the body cap and its name for this request."""
        route = self._matched(scope)
        is_webhook = route is not None and route.path == self.webhook_path
        if is_webhook:
            webhook_precheck(self.tokens, headers)
            limit, what = self.webhook_max_bytes, "webhook body"
        else:
            if route is not None and scope["method"] in STATE_CHANGING_METHODS:
                require_admin(self.tokens, headers.get("authorization"))
            limit, what = self.max_body_bytes, "request body"
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise HTTPException(400, "invalid Content-Length")
            if int(declared) > limit:
                raise BodyTooLarge(limit, what)
        return limit, what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check one request, then hand it to the application with a counting ``receive``."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            limit, what = self._check(scope, headers)
        except StarletteHTTPException as exc:
            await _refusal(exc)(scope, receive, send)
            return
        received = 0
        body_done = False
        overflow: StarletteHTTPException | None = None
        started = False

        async def counting_receive() -> Message:
            nonlocal received, overflow, body_done
            if overflow is not None:
                raise overflow
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                overflow = BodyStalled(self.body_timeout)
                raise overflow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    overflow = BodyTooLarge(limit, what)
                    raise overflow
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except (BodyTooLarge, BodyStalled) as exc:
            if started:
                raise
            await _refusal(exc)(scope, receive, send)
            return
        if overflow is not None and not started:
            await _refusal(overflow)(scope, receive, send)
