"""``GET /api/v1/notifications``: the webhook delivery log, newest first, one page at a time."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, Query

from fleet_server.api.auth import Tokens, read_access

__all__ = ["NotificationReader", "notifications_router"]

MAX_PAGE = 1000


class NotificationReader(Protocol):
    """The store read this route needs (every store backend provides it)."""

    def deliveries_page(self, *, state: str | None = None, offset: int = 0,
                        limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """Return ``(total, page)`` of deliveries (in ``state`` when given), newest first."""
        ...


def notifications_router(store: NotificationReader, tokens: Tokens) -> APIRouter:
    """Build the router of the delivery log; it needs the read token when one is configured."""
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(read_access(tokens))])

    @router.get("/notifications")
    def list_notifications(
        state: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> dict[str, Any]:
        """List webhook deliveries, newest first (only those in ``state`` when given), with how many
        match in all: ``{"notifications": [...], "total": N, "limit": L, "offset": O}``. Each has its
        receiver, event, event id, state, attempts, and the time, HTTP status and error of the latest
        attempt; never the body or a secret."""
        total, page = store.deliveries_page(state=state, offset=offset, limit=limit)
        return {"notifications": page, "total": total, "limit": limit, "offset": offset}

    return router
