"""Plain HTTP on the WebSocket port: `/healthz`, `/metrics` (`server.metrics_path`), 404
elsewhere, 503 when full or degraded."""

from __future__ import annotations

import http
from collections.abc import Callable
from typing import Any

import orjson
from websockets.http11 import Request, Response

from shoal.workers import exposition
from shoal.workers.transport import WebSocket

HEALTH_PATH = "/healthz"

Route = Callable[[WebSocket, Request], Response | None]


def router(
    ws_path: str,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    admit: Callable[[WebSocket], str | None],
    metrics_path: str | None = None,
    metrics: Callable[[], bytes] | None = None,
) -> Route:
    """Build the handshake router of a worker's connections.

    Args:
        ws_path: the WebSocket path; upgrades elsewhere get 404.
        health: returns (healthy, details) for `/healthz`.
        admit: returns None to accept the handshake of a connection (which then counts
            against `max_connection`), or why it is refused (503).
        metrics_path: where `metrics` answers; None: nowhere.
        metrics: returns the body of the metrics page (`shoal.workers.exposition`).
    """

    def route(ws: WebSocket, request: Request) -> Response | None:
        respond = ws.protocol.reject
        path = request.path.partition("?")[0]
        if path == HEALTH_PATH:
            healthy, details = health()
            status = http.HTTPStatus.OK if healthy else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _answer(respond(status, ""), orjson.dumps(details) + b"\n", "application/json")
        if path == metrics_path and metrics is not None:
            return _answer(respond(http.HTTPStatus.OK, ""), metrics(), exposition.CONTENT_TYPE)
        if path != ws_path:
            return respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        # A request without an upgrade goes on to websockets' handshake, which answers
        # 426 Upgrade Required, or 400 when the upgrade itself is malformed.
        if "Upgrade" not in request.headers:
            return None
        refusal = admit(ws)
        if refusal is not None:
            return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, refusal + "\n")
        return None

    return route


def _answer(response: Response, body: bytes, content_type: str) -> Response:
    """`response` with `body` of `content_type` in place of its own."""
    response.body = body
    # Headers is a multi-dict: assignment would add a second value.
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    return response
