"""Plain HTTP on the WebSocket port: `/healthz` (status only), the browser demo page at
`/` when `server.demo_page` is on, 404 elsewhere, 503 when full or degraded; and on the
admin listener (`server.admin_host`, `server.admin_port`):
`/healthz` with the node's details and `/metrics` (`server.metrics_path`).

The public `/healthz` tells a load balancer whether to send clients here, and nothing
about the node: no worker ids, pids, node id or counts, which help an attacker time a
flood or map a deployment. Those, and the metrics (counts of everything), answer only on
the admin listener, which listens on localhost unless told otherwise."""

from __future__ import annotations

import http
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from websockets.http11 import Request, Response

from shoal.workers import demo, exposition
from shoal.workers.exchange import Exchanges, HttpResponse, Responder
from shoal.workers.transport import WebSocket

HEALTH_PATH = "/healthz"

Route = Callable[[WebSocket, Request], Response | None]


def router(
    ws_path: str,
    healthy: Callable[[], bool],
    admit: Callable[[WebSocket], str | None],
    page: demo.Page | None = None,
    *,
    pusher_prefix: str | None = None,
) -> Route:
    """Build the handshake router of a worker's connections.

    Args:
        ws_path: the WebSocket path; upgrades elsewhere get 404.
        pusher_prefix: where the Pusher endpoint's upgrades go (`/app/`), if it is on.
        healthy: whether `/healthz` answers 200 `{"status": "ok"}` (else 503).
        admit: returns None to accept the handshake of a connection (which then counts
            against `max_connection`), or why it is refused (503).
        page: the demo page, answered at `/` to requests without an upgrade; None: `/`
            is a path like any other (404).
    """

    def route(ws: WebSocket, request: Request) -> Response | None:
        respond = ws.protocol.reject
        path = request.path.partition("?")[0]
        if path == HEALTH_PATH:
            return _health(ws, healthy(), {})
        if page is not None and path == demo.PATH and "Upgrade" not in request.headers:
            return _page(ws, page)
        if path != ws_path and (pusher_prefix is None or not path.startswith(pusher_prefix)):
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


def _health(ws: WebSocket, healthy: bool, details: dict[str, Any]) -> Response:
    """`/healthz`: 200 `{"status": "ok", **details}`, or 503 with the status."""
    status = http.HTTPStatus.OK if healthy else http.HTTPStatus.SERVICE_UNAVAILABLE
    return json_response(ws, status, {"status": "ok" if healthy else "redis unreachable",
                                      **details})  # fmt: skip


def _page(ws: WebSocket, page: demo.Page) -> Response:
    """200 with the demo page and its headers."""
    response = _answer(ws.protocol.reject(http.HTTPStatus.OK, ""), page.body,
                       demo.CONTENT_TYPE)  # fmt: skip
    for name, value in page.headers:
        response.headers[name] = value
    return response


def json_response(ws: WebSocket, status: int, body: Mapping[str, Any], **headers: str) -> Response:
    """An HTTP answer of `status` with a short JSON body (a refused handshake, `/healthz`);
    each keyword is a header, `_` written `-` (`Retry_After="5"`)."""
    response = _answer(ws.protocol.reject(status, ""), orjson.dumps(body) + b"\n",
                       "application/json")  # fmt: skip
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def plain_response(ws: WebSocket, answer: HttpResponse) -> Response:
    """A responder's answer (`shoal.workers.exchange`) to a request that reached
    websockets' parser (a GET), written as a refused handshake: the connection closes."""
    response = ws.protocol.reject(answer.status, "")
    headers = dict(answer.headers)
    content_type = headers.pop("content-type", "text/plain; charset=utf-8")
    response = _answer(response, answer.body, content_type)
    for name, value in headers.items():
        response.headers[name] = value
    return response


class Admin:
    """The admin listener's connections (`shoal.workers.transport.Handlers`): every
    request gets a plain HTTP answer, and none becomes a WebSocket.

    Args:
        health: returns (healthy, details) for `/healthz`.
        metrics_path: where `metrics` answers; None: nowhere.
        metrics: returns the body of the metrics page (`shoal.workers.exposition`).
    """

    def __init__(
        self,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        metrics_path: str | None,
        metrics: Callable[[], bytes],
    ) -> None:
        self.health = health
        self.metrics_path = metrics_path
        self.metrics = metrics
        self.exchanges = Exchanges()  # each refused with 405 (`responder`), then closed

    def route(self, ws: WebSocket, request: Request) -> Response:
        path = request.path.partition("?")[0]
        if path == HEALTH_PATH:
            return _health(ws, *self.health())
        if path == self.metrics_path:
            page = ws.protocol.reject(http.HTTPStatus.OK, "")
            return _answer(page, self.metrics(), exposition.CONTENT_TYPE)
        return ws.protocol.reject(http.HTTPStatus.NOT_FOUND, "Not Found\n")

    # Nothing else ever happens to an admin connection: it is answered, then closed.

    def made(self, ws: WebSocket) -> None:
        pass

    def responder(self, ws: WebSocket) -> Responder | None:
        return None  # only GETs are served here: anything else gets 405

    def opened(self, ws: WebSocket, request: Request) -> None:  # pragma: no cover
        raise AssertionError("the admin listener accepts no WebSocket")

    def received(self, ws: WebSocket, data: str | bytes) -> None:  # pragma: no cover
        pass

    def lost(self, ws: WebSocket) -> None:
        pass

    def overflowed(self, ws: WebSocket) -> None:  # pragma: no cover
        ws.abort()


def _answer(response: Response, body: bytes, content_type: str) -> Response:
    """`response` with `body` of `content_type` in place of its own."""
    response.body = body
    # Headers is a multi-dict: assignment would add a second value.
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    return response
