"""Plain HTTP on the WebSocket port: `/healthz`, 404 elsewhere, 503 when full or degraded."""

from __future__ import annotations

import http
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

HEALTH_PATH = "/healthz"

ProcessRequest = Callable[[ServerConnection, Request], Response | None]


def router(
    ws_path: str,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    admit: Callable[[ServerConnection], str | None],
) -> ProcessRequest:
    """Build websockets' `process_request` hook.

    Args:
        ws_path: the WebSocket path; upgrades elsewhere get 404.
        health: returns (healthy, details) for `/healthz`.
        admit: returns None to accept the handshake of a connection (which then counts
            against `max_connection`), or why it is refused (503).
    """

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == HEALTH_PATH:
            healthy, details = health()
            status = http.HTTPStatus.OK if healthy else http.HTTPStatus.SERVICE_UNAVAILABLE
            response = connection.respond(status, "")
            response.body = orjson.dumps(details) + b"\n"
            # Headers is a multi-dict: assignment would add a second value.
            del response.headers["Content-Type"], response.headers["Content-Length"]
            response.headers["Content-Type"] = "application/json"
            response.headers["Content-Length"] = str(len(response.body))
            return response
        if path != ws_path:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        # A request without an upgrade goes on to websockets, which answers
        # 426 Upgrade Required, or 400 when the upgrade itself is malformed.
        if "Upgrade" not in request.headers:
            return None
        refusal = admit(connection)
        if refusal is not None:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, refusal + "\n")
        return None

    return process_request
