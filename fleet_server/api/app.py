"""The fleet server's HTTP API: ``create_app`` wires the routes, authentication and error handling.

Endpoints (details and examples in ``docs/api.md``):

    GET  /api/v1/devices            devices, filtered (label=k=v repeated, sync_state, online), paged
    GET  /api/v1/devices/{id}       one device with its newest events and health samples
    POST /api/v1/devices            enroll a device before it reports (admin token; audited)
    GET  /api/v1/summary            fleet totals
    GET  /api/v1/releases           signed releases the Git watcher recorded
    GET  /api/v1/audit              the audit log
    POST /api/v1/hooks/git          webhook: poll the Git mirror now (HMAC signature or admin token)
    GET  /metrics                   Prometheus text exposition
    GET  /healthz                   liveness: ok or degraded with reasons (no authentication)

Every error is JSON ``{"error": "<reason>"}`` with a fitting status code: 400 for bad input
(including query values FastAPI rejects, which it would answer with 422), 401/403 for credentials,
404, 405, 413 for a body over ``http.max_body_bytes`` (the webhook's over ``MAX_WEBHOOK_BYTES``),
503 when the store or the Git watcher is unavailable. Bad input never produces a 500.

:class:`fleet_server.api.guard.RequestGuard` sits in front of every route: a state-changing call is
refused (401/403) on its ``Authorization`` header before its body is read, and no body is read past
its cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from fleet_server import __version__
from fleet_server.api.auth import Tokens, load_tokens, read_access, require_admin, signature_valid
from fleet_server.api.bodies import body_error_reason
from fleet_server.api.dashboard import install_dashboard
from fleet_server.api.guard import RequestGuard
from fleet_server.api.routes_enroll import DeviceRegistry, enroll_router
from fleet_server.api.routes_fleet import FleetReader, fleet_router
from fleet_server.api.routes_notifications import NotificationReader, notifications_router
from fleet_server.api.routes_pause import pause_router
from fleet_server.api.routes_rollouts import RolloutControl, rollouts_router
from fleet_server.errors import NotLeader, StoreError
from fleet_server.health import health_status
from fleet_server.metrics import ServerMetrics
from fleet_server.remote_pause import RemotePause

if TYPE_CHECKING:
    from fleet_server.config import ServerConfig

__all__ = ["MAX_WEBHOOK_BYTES", "ApiActions", "ApiStore", "create_app"]

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 1024 * 1024
"""Largest webhook body accepted (Git hosts send push payloads well under this); never more than
``http.max_body_bytes``."""

WEBHOOK_PATH = "/api/v1/hooks/git"


class ApiStore(FleetReader, DeviceRegistry, NotificationReader, Protocol):
    """Everything the API asks of the store (``fleet_server.store.Store`` provides it)."""


@dataclass(frozen=True)
class ApiActions:
    """The server's actions the API may start; an action that is None answers 503.

    Attributes:
        trigger_git: make the Git watcher poll the mirror now (``LeaderDuties.trigger_git``: at once on
            the leader, through a poll request in the store on a follower).
        rollouts: the rollout runner behind ``/api/v1/rollouts`` (the routes are absent when None).
        pauses: the remote pause behind ``/api/v1/devices/.../pause|resume`` (absent when None).
    """

    trigger_git: Callable[[], None] | None = None
    rollouts: RolloutControl | None = None
    pauses: RemotePause | None = None


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _validation_reason(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path", "header"))
    return f"invalid {where or 'request'}: {first.get('msg', 'invalid value')}"


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        reason = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and reason == "Not Found":
            reason = "not found"
        return _error(exc.status_code, reason, dict(exc.headers) if exc.headers else None)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _error(400, body_error_reason(exc.errors()) or _validation_reason(exc))

    async def store_error(_request: Request, exc: Exception) -> Response:
        log.error("store unavailable: %s", exc)
        return _error(503, "the fleet database is unavailable")

    async def not_leader(_request: Request, exc: Exception) -> Response:
        log.warning("rollout write refused: %s", exc)
        return _error(409, "this replica is not the leader: send rollout commands to the leader "
                           "(its /healthz says \"role\": \"leader\")")

    async def unexpected_error(_request: Request, exc: Exception) -> Response:
        log.error("unexpected error in the API", exc_info=exc)
        return _error(500, "internal error")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StoreError, store_error)
    app.add_exception_handler(NotLeader, not_leader)
    app.add_exception_handler(Exception, unexpected_error)


async def _read_capped_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_WEBHOOK_BYTES):
        raise HTTPException(413, f"webhook body over {MAX_WEBHOOK_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_WEBHOOK_BYTES:
            raise HTTPException(413, f"webhook body over {MAX_WEBHOOK_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _webhook_actor(tokens: Tokens, body: bytes, signature: str | None, authorization: str | None) -> str:
    """Return who is calling the webhook, or raise 401/403."""
    if signature is not None:
        if tokens.webhook is None:
            raise HTTPException(403, "webhook signatures are not accepted: no webhook secret is configured")
        if not signature_valid(tokens.webhook, body, signature):
            raise HTTPException(403, "invalid webhook signature")
        return "webhook"
    if authorization is None and tokens.webhook is not None:
        raise HTTPException(401, "X-Hub-Signature-256 or an admin token required",
                            headers={"WWW-Authenticate": "Bearer"})
    require_admin(tokens, authorization)
    return "admin"


def create_app(store: ApiStore, config: ServerConfig, metrics: ServerMetrics, *,
               actions: ApiActions) -> FastAPI:
    """Build the FastAPI application of one fleet server.

    Args:
        store: the fleet database.
        config: the server configuration (token files, webhook secret, Git URL).
        metrics: rendered by ``GET /metrics``.
        actions: the server actions the API may start.

    Raises:
        ServerConfigError: a configured token or secret file cannot be read or is empty.
    """
    tokens = load_tokens(config.http.admin_token_file, config.http.read_token_file,
                         config.git.webhook_secret_file)
    git_target = config.git.url or "git"
    app = FastAPI(title="edge-fleet server", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url=None, redoc_url=None)
    _install_error_handlers(app)
    routers = [fleet_router(store, tokens), enroll_router(store, tokens), notifications_router(store, tokens)]
    if actions.rollouts is not None:
        routers.append(rollouts_router(actions.rollouts, tokens))
    if actions.pauses is not None:
        routers.append(pause_router(store, actions.pauses, tokens))
    for router in routers:
        app.include_router(router)
    routers.append(install_dashboard(app, store, tokens))

    def every_route() -> list[BaseRoute]:
        return [*(route for router in routers for route in router.routes), *app.router.routes]

    app.add_middleware(RequestGuard, routes=every_route, tokens=tokens,
                       max_body_bytes=config.http.max_body_bytes, webhook_path=WEBHOOK_PATH,
                       webhook_max_bytes=MAX_WEBHOOK_BYTES, body_timeout=config.http.body_timeout)

    @app.post(WEBHOOK_PATH, status_code=202)
    async def git_webhook(
        request: Request,
        x_hub_signature_256: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Wake the Git watcher to poll the mirror now; needs a valid HMAC signature or the admin token."""
        body = await _read_capped_body(request)
        actor = _webhook_actor(tokens, body, x_hub_signature_256, authorization)
        if actions.trigger_git is None:
            raise HTTPException(503, "the git watcher is not running")
        await run_in_threadpool(actions.trigger_git)  # a follower records the request in the store
        await run_in_threadpool(store.add_audit, actor, "git.poll", git_target, "webhook")
        return {"triggered": True}

    @app.get("/metrics", dependencies=[Depends(read_access(tokens))])
    def prometheus_metrics() -> Response:
        """Return every metric in the Prometheus text format (read token needed when configured)."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Answer ``ok``, or ``degraded`` with the reasons (broker unreachable, ingest lag): see health.py."""
        role = metrics.role.role() if metrics.role is not None else None
        backend = getattr(store, "backend", None)
        return health_status(metrics.ingest, max_lag=config.ingest.max_lag, store=backend, role=role)

    return app
