"""The life of each client connection of a worker, from its handshake to its state's
removal, run on the transport's callbacks (`shoal.workers.transport.Handlers`).

Order and cost: a connection's messages are handled one at a time, in the order they
arrived. A handler starts in the read callback itself (`shoal.workers.eager`); only one
that has to wait (for Redis, say) gets a task, and the connection's next messages wait
in its inbox meanwhile. A client whose inbox grows past `_INBOX_HIGH` messages is not
read from until its handlers catch up (back to `_INBOX_LOW`): a flood from one client
costs that client latency, not the worker its memory. A publish that finds Redis behind
(`shoal.core.bus`) makes its handler wait the same way, so a client publishes no faster
than the slowest worker of the deployment reads.

Rate limits (`limits.*`, `shoal.workers.ratelimit`) are checked as each message arrives,
before it is handled or held: one over its connection's rate is answered
`Rate limit exceeded` in its turn and has no effect, and sustained abuse closes the
connection with 1008.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import secrets
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from websockets.http11 import Request, Response

from shoal.core import app as app_api
from shoal.core import auth, protocol
from shoal.core import pusher as pusher_protocol
from shoal.core.auth import Identity, PermissionDenied, Unauthorized
from shoal.core.errors import ProtocolError, ServiceUnavailable
from shoal.core.jobs import Outcome
from shoal.core.metrics import BINARY, FRAME_ERRORS, OTHER, TEXT, counters
from shoal.core.schema import ADVICE, CloseCode
from shoal.workers import eager, pusherapi
from shoal.workers import pusher as pusher_endpoint
from shoal.workers.addresses import counted_as
from shoal.workers.admission import Admission
from shoal.workers.connection import Connection
from shoal.workers.exchange import Exchanges, HttpRequest, HttpResponse, Responder
from shoal.workers.gate import Gate
from shoal.workers.http import Route, json_response, plain_response
from shoal.workers.hub import Hub
from shoal.workers.keeper import Departures, Keeper
from shoal.workers.pusher import Pusher
from shoal.workers.ratelimit import Allowance, Rates, Verdict
from shoal.workers.transport import DEFER, Deferred, WebSocket

logger = logging.getLogger(__name__)

_INBOX_HIGH = 64
_INBOX_LOW = 16
_CLOSED = object()  # the inbox's last item: the connection is gone
_RATE_LIMITED = {"type": "error", "message": "Rate limit exceeded"}
_INTERNAL_ERROR = b'{"error": "internal error"}\n'
# Who a Pusher client is at its handshake: its app decides the rest (`opened`).
PUSHER_IDENTITY = Identity(pusher_endpoint.USER_PREFIX, "pusher")


class Sessions:
    """The connections of one worker, as the transport reports them.

    Args:
        worker_id: this worker's id, the prefix of its connection ids.
        app: the application.
        hub: the worker's hub.
        keeper: its state-keeping, for removals that failed.
        admission: its connection count.
        router: answers plain HTTP and refuses handshakes (`shoal.workers.http`).
        gate: who may connect (tokens, bans).
        rates: what each connection may send (`limits.*`); None for no limit.
        log_connections: log a line when each connection opens and closes
            (`log.connections`).
        pusher: the Pusher endpoint (`/app/{key}`), if `pusher.apps` names any.
        responder: answers plain HTTP requests on the WebSocket port, those that cannot
            be handshakes (`shoal.workers.exchange`); None: each gets 405.
    """

    def __init__(  # noqa: PLR0917 - the parts a worker composes, named where it builds them
        self,
        worker_id: str,
        app: app_api.App,
        hub: Hub,
        keeper: Keeper,
        admission: Admission,
        router: Route,
        gate: Gate,
        *,
        rates: Rates | None = None,
        log_connections: bool = True,
        pusher: Pusher | None = None,
        responder: Responder | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.pusher = pusher
        self.api = responder if pusher is not None else None
        # A Pusher client's id is its socket_id, `<n>.<m>`: `n` is this worker's, random
        # among 9 * 10**14 (two of a thousand live workers share one with a chance of
        # about 6 in 10**10), since the server libraries accept digits only.
        self.socket_number = secrets.randbelow(9 * 10**14) + 10**14
        self.app = app
        self.closing: CloseCode | None = None
        """The worker is stopping: a connection whose handshake ends now is closed so."""
        self.hub = hub
        self.keeper = keeper
        self.admission = admission
        self.router = router
        self.gate = gate
        self.policy = hub.policy
        self.rates = rates if rates is not None and rates.enabled else None
        self.log_connections = log_connections
        self.http_responder = responder
        self.exchanges = Exchanges()
        """The connections served as plain HTTP (the Pusher HTTP API's POSTs)."""
        self.loop = asyncio.get_running_loop()
        # Connections whose opening handshake completed, with their Connection (None
        # for one being refused): what lost() counts and logs, whatever became of it.
        self.open: dict[WebSocket, Connection | None] = {}
        self.handshaking: set[WebSocket] = set()
        # Handlers that had to wait: asyncio keeps only weak references to tasks.
        self.running: set[asyncio.Task[None]] = set()
        # Registrations on their way to Redis (`opened()`).
        self.registering: set[asyncio.Future[list[Any]]] = set()
        self.sequence = 0

    # The transport's callbacks

    def made(self, ws: WebSocket) -> None:
        self.handshaking.add(ws)

    def responder(self, ws: WebSocket) -> Responder | None:
        return self.http_responder

    def route(self, ws: WebSocket, request: Request) -> Response | Deferred | None:
        api = self.api
        if api is not None and pusherapi.handles(request.path.partition("?")[0]):
            # A GET of the Pusher HTTP API, the first request of its connection (later
            # ones, and every other method, reach the `Exchange` that `responder` serves).
            exchange = HttpRequest(
                request.method,
                request.path,
                [(name.lower(), value) for name, value in request.headers.raw_items()],
                b"",
                ws.remote_host,
            )
            self.hub.spawn(self._answer(ws, api, exchange))
            return DEFER
        response = self.router(ws, request)
        if response is not None or not ws.admitted:  # answered, or not an upgrade
            return response
        gate = self.gate
        try:
            if self._pusher_path(request.path):
                identity = PUSHER_IDENTITY  # Pusher's own signatures say who may do what
            else:
                identity = gate.identify(request)
        except Unauthorized as exc:
            counters.handshakes_refused["unauthorized"] += 1
            body = {"error": "unauthorized", "reason": str(exc)}
            return json_response(ws, http.HTTPStatus.UNAUTHORIZED, body, WWW_Authenticate="Bearer")
        except ServiceUnavailable as exc:  # before ProtocolError: it is one
            return self._unavailable(ws, str(exc))
        except ProtocolError as exc:
            counters.handshakes_refused["invalid"] += 1
            return json_response(ws, http.HTTPStatus.BAD_REQUEST, {"error": "bad request",
                                                             "reason": str(exc)})  # fmt: skip
        ws.identity = identity
        addresses = gate.addresses
        if addresses.trusted:
            forwarded = request.headers.get_all("X-Forwarded-For")
            ws.client = addresses.client(ws.remote_host, forwarded)
        slot = None
        if addresses.limited:
            # The connection's id, chosen now: it names the address slot it holds.
            self.sequence += 1
            slot = (counted_as(ws.client or ws.remote_host), f"{self.worker_id}.{self.sequence}")
        commands = gate.checks(identity, slot)
        if not commands:
            return None
        try:
            checked = self.hub.registry.redis.submit(commands)
        except ServiceUnavailable:
            return self._unavailable(ws, "redis unavailable")
        ws.slot = slot  # given back in lost(), whatever the checks answer
        self.registering.add(checked)
        checked.add_done_callback(functools.partial(self._checked, ws))
        return DEFER

    @staticmethod
    async def _answer(ws: WebSocket, api: Responder, request: HttpRequest) -> None:
        """Answer a deferred plain HTTP request with what `api` says."""
        try:
            answer = await api(request)
        except Exception:
            logger.exception(
                "answering %s %s failed", request.method, request.target.partition("?")[0]
            )
            answer = HttpResponse(
                500, b'{"error": "internal error"}\n', [("content-type", "application/json")]
            )
        counters.answered(answer.status)
        ws.respond(plain_response(ws, answer))

    def _checked(self, ws: WebSocket, checked: asyncio.Future[list[Any]]) -> None:
        """The Redis checks of a deferred handshake came back: accept or refuse it."""
        self.registering.discard(checked)
        if checked.cancelled() or checked.exception() is not None:
            ws.respond(self._unavailable(ws, "redis unavailable"))
            return
        refusal = self.gate.refusal(ws.identity, checked.result())
        if refusal is None:
            ws.respond(None)
            return
        counters.handshakes_refused[refusal.label] += 1
        ws.respond(json_response(ws, refusal.status, refusal.body, Retry_After=refusal.retry_after))

    def _release(self, ip: str, cid: str) -> None:
        """Give back the address slot `cid` held; if Redis fails, the keeper retries."""
        try:
            released = self.hub.registry.redis.submit(self.gate.addresses.release(ip, cid))
        except ServiceUnavailable:
            self.keeper.release_failed(ip, cid)
            return
        released.add_done_callback(functools.partial(self._released, ip, cid))

    def _released(self, ip: str, cid: str, released: asyncio.Future[list[Any]]) -> None:
        if released.cancelled() or released.exception() is not None:
            self.keeper.release_failed(ip, cid)

    @staticmethod
    def _unavailable(ws: WebSocket, reason: str) -> Response:
        counters.handshakes_refused["unavailable"] += 1
        body = {"error": "unavailable", "reason": reason}
        return json_response(ws, http.HTTPStatus.SERVICE_UNAVAILABLE, body, Retry_After="1")

    def _pusher_path(self, path: str) -> bool:
        return self.pusher is not None and path.startswith(pusher_endpoint.PATH_PREFIX)

    def opened(self, ws: WebSocket, request: Request) -> None:
        self.handshaking.discard(ws)
        self.open[ws] = None
        counters.connections_opened += 1
        identity: Identity = ws.identity
        ws.identity = None
        app, client = self.app, None
        if self.pusher is not None and self._pusher_path(request.path):
            app = self.pusher.app
            client = self.pusher.client(request.path, request.headers.get("Origin"))
            identity = Identity(pusher_endpoint.user_of(client), PUSHER_IDENTITY.role)
        if ws.slot is not None:
            cid = ws.slot[1]
        else:
            self.sequence += 1
            cid = f"{self.worker_id}.{self.sequence}"
        if client is not None:
            cid = f"{self.socket_number}.{self.sequence}"
        conn = Connection(
            cid,
            identity,
            ws,
            self.hub,
            app=app,
            connected_at=int(time.time() * 1000),
            request_path=auth.without_token(request.path),
            pusher_client=client,
        )
        ws.session = self.open[ws] = conn
        self._expire(conn)
        if self.log_connections:
            # Never the request's path: its query string may carry a token.
            logger.info(
                "connection opened: id=%s user=%s role=%s address=%s",
                conn.id,
                conn.user_id,
                identity.role,
                conn.address,
            )
        # The 101 leaves once the connection's state is in Redis, in one send() with
        # whatever `on_open` sends before it first waits (the welcome).
        ws.cork()
        conn.busy = True  # messages sent before the 101 (they should not be) wait
        try:
            registration = self.hub.register(conn)
        except ServiceUnavailable:
            self._unregistered(conn)
            return
        self.registering.add(registration)
        registration.add_done_callback(functools.partial(self._registered, conn))

    def _expire(self, conn: Connection) -> None:
        """Close `conn` with 4002 when its token expires (after `auth.jwt.leeway`)."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        expires_at = conn.identity.expires_at
        if expires_at is not None:
            delay = max(0.0, expires_at + self.gate.leeway - time.time())
            conn.expiry = self.loop.call_later(delay, self._expired, conn)

    @staticmethod
    def _expired(conn: Connection) -> None:
        conn.expiry = None
        conn.close_soon(CloseCode.TOKEN_EXPIRED, ADVICE[CloseCode.TOKEN_EXPIRED].reason)

    def received(self, ws: WebSocket, data: str | bytes) -> None:
        conn: Connection | None = ws.session
        if conn is None:
            return  # being refused (an invalid user_id)
        if self.rates is not None:
            allowance = conn.allowance
            if allowance is None:
                allowance = conn.allowance = Allowance(self.rates, ws.last_seen)
            # Payload bytes: a str's length is its size when it is ASCII (a flag CPython
            # keeps, so no scan); only other text is encoded to be measured.
            size = len(data) if type(data) is bytes or data.isascii() else len(data.encode())  # type: ignore[union-attr]
            # The read's time (`last_seen`): no clock call per message.
            verdict = allowance.take(size, ws.last_seen)
            if verdict:
                self._limited(conn, verdict)
                return
        if conn.busy:
            if conn.hold(data) == _INBOX_HIGH:
                ws.pause_reading()
            return
        self._start(conn, self._dispatch(conn, data))

    def lost(self, ws: WebSocket) -> None:
        if ws.admitted:
            ws.admitted = False
            self.admission.release()
        if ws.slot is not None:
            self._release(*ws.slot)
            ws.slot = None
        self.handshaking.discard(ws)
        if ws in self.open:
            self._closed(ws, self.open.pop(ws))
        conn: Connection | None = ws.session
        if conn is None:
            return
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        # What the client sent before it went is still handled, then the state removed.
        if conn.busy:
            conn.hold(_CLOSED)
        else:
            self._start(conn, self._forget(conn))

    def _closed(self, ws: WebSocket, conn: Connection | None) -> None:
        """Count an open connection that is gone, and log it."""
        code, ours = ws.close_code()
        counters.closed(code)
        if ours and code in FRAME_ERRORS:
            counters.protocol_errors["frame"] += 1
        if conn is not None and self.log_connections:
            logger.info(
                "connection closed: id=%s user=%s address=%s duration=%.3fs code=%d",
                conn.id,
                conn.user_id,
                conn.address,
                time.time() - conn.connected_at / 1000,
                code,
            )

    def overflowed(self, ws: WebSocket) -> None:
        conn: Connection | None = ws.session
        if conn is not None:
            conn.cut_off()

    # Running handlers in order

    def _start(self, conn: Connection, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` now; if it has to wait, hold the connection's next messages."""
        while True:
            try:
                task = eager.start(coro, self.loop)
            except Exception:  # the coroutines below handle their own errors
                logger.exception("handler failed on connection %s", conn.id)
                task = None
            if task is not None:
                conn.busy = True
                self.running.add(task)
                task.add_done_callback(functools.partial(self._resume, conn))
                return
            following = self._next(conn)
            if following is None:
                return
            coro = following

    def _resume(self, conn: Connection, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        conn.busy = False
        if not task.cancelled() and task.exception() is not None:
            logger.error("handler failed on connection %s", conn.id, exc_info=task.exception())
        following = self._next(conn)
        if following is not None:
            self._start(conn, following)

    def _next(self, conn: Connection) -> Coroutine[Any, Any, None] | None:
        """The handler of the connection's next waiting message, if any. With none
        left, the close frame held back for their replies may go."""
        inbox = conn.inbox
        if not inbox:
            conn.inbox = None
            if conn.ws.replying:
                conn.ws.replied()
            return None
        item = inbox.popleft()
        if len(inbox) == _INBOX_LOW:
            conn.ws.resume_reading()
        if item is _CLOSED:
            return self._forget(conn)
        if type(item) is Verdict:
            return self._refuse(conn, item)
        return self._dispatch(conn, item)

    # Rate limits

    def _limited(self, conn: Connection, verdict: Verdict) -> None:
        """A message over the connection's rate: refuse it, in order with the replies
        to what came before it, and close the connection on sustained abuse."""
        counters.rate_limited += 1
        if conn.closing:
            return  # nothing more reaches a closing connection: no need to answer
        if conn.busy:
            if conn.hold(verdict) == _INBOX_HIGH:
                conn.ws.pause_reading()
            return
        self._start(conn, self._refuse(conn, verdict))

    @staticmethod
    async def _refuse(conn: Connection, verdict: Verdict) -> None:
        if conn.pusher is not None:
            refused = pusher_protocol.error_frame(_RATE_LIMITED["message"], None)
            conn.push(protocol.frame(refused), refused, True)
        else:
            await conn.send(_RATE_LIMITED)
        if verdict is Verdict.CLOSE:
            conn.close_soon(CloseCode.POLICY_VIOLATION, _RATE_LIMITED["message"])

    # One connection's life

    def _registered(self, conn: Connection, registration: asyncio.Future[list[Any]]) -> None:
        """The connection's registration came back: run `on_open`, then send the 101."""
        self.registering.discard(registration)
        conn.busy = False
        error = registration.exception()
        if error is not None:
            if not isinstance(error, ServiceUnavailable):
                logger.error("registering %s failed", conn.id, exc_info=error)
            self._unregistered(conn)
            return
        self.hub.adopt(conn)
        try:
            self._start(conn, self._on_open(conn.app.open_handler, conn))
        finally:
            conn.ws.uncork()
        if self.closing is not None:
            conn.close_soon(self.closing, ADVICE[self.closing].reason)

    def _unregistered(self, conn: Connection) -> None:
        """Redis failed while registering: close with 1013, remove what was written."""
        # Part of its state may have been written: remove it once Redis answers.
        self.keeper.removal_failed(conn.id, conn.user_id, (), told=True)
        conn.ws.session = None  # nothing more to do for it when it goes
        conn.inbox = None
        conn.close_soon(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
        conn.ws.uncork()

    @staticmethod
    async def _on_open(handler: app_api.OpenHandler | None, conn: Connection) -> None:
        if handler is None:
            return
        try:
            await handler(conn)
        except ServiceUnavailable:
            conn.close_soon(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
        except ProtocolError as exc:
            conn.close_soon(CloseCode.POLICY_VIOLATION, str(exc))
        except Exception:
            logger.exception("on_open failed on connection %s", conn.id)
            conn.close_soon(CloseCode.INTERNAL_ERROR, "internal error")

    async def _dispatch(self, conn: Connection, data: str | bytes) -> None:
        app = conn.app
        received = counters.messages_in
        try:
            if app.frame_handler is not None:
                received[TEXT if type(data) is str else BINARY] += 1
                await app.frame_handler(conn, data)
            elif type(data) is bytes:
                received[BINARY] += 1
                if app.binary_handler is None:
                    raise ProtocolError("Binary frames are not supported")
                await app.binary_handler(conn, data)
            else:
                try:
                    message = protocol.parse(data)
                except ProtocolError:
                    received[OTHER] += 1
                    raise
                kind = message["type"]  # a str (`protocol.parse`)
                # Not try/except KeyError: raising costs more than the message's echo
                # for applications whose types the chat schema does not know.
                received[kind if kind in received else OTHER] += 1
                handler = app.handlers.get(kind)
                if handler is None:
                    if kind == "refresh":  # unless the application handles it itself
                        await self._refresh(conn, message)
                        return
                    handler = app.default_handler
                    if handler is None:
                        raise ProtocolError("Unknown message type")
                if self.policy.restricts_messages and not self.policy.may_send(
                    conn.identity.role, kind
                ):
                    raise PermissionDenied
                await handler(conn, message)
        except ServiceUnavailable:
            # Whatever Redis said stays in the log; the client learns it may retry.
            await conn.send({"type": "error", "message": ServiceUnavailable().args[0]})
        except ProtocolError as exc:
            counters.protocol_errors["message"] += 1
            await conn.send({"type": "error", "message": str(exc)})
        except Exception:
            logger.exception("handler failed on connection %s", conn.id)
            await conn.send({"type": "error", "message": "Internal error"})

    async def _refresh(self, conn: Connection, message: dict[str, Any]) -> None:
        """`{"type": "refresh", "token": T}`: a new token for the same user pushes the
        connection's expiry back (and may change its role)."""
        if not self.gate.enabled:
            raise ProtocolError("Authentication is off")
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("Invalid token")
        try:
            identity = self.gate.verify(token)
        except Unauthorized as exc:
            raise ProtocolError(f"Invalid token: {exc}") from None
        if identity.user_id != conn.user_id:
            raise ProtocolError("Token is for another user")
        conn.identity = identity
        self._expire(conn)
        assert identity.expires_at is not None
        await conn.send({"type": "refreshed", "expires_at": int(identity.expires_at)})

    async def _forget(self, conn: Connection) -> None:
        """Run `on_close`, then remove the connection's state.

        If Redis fails on the way, nothing is lost: the removal is retried, and rooms
        `on_close` could not tell are told through `on_departed`, once Redis is back.
        """
        rooms = tuple(sorted(conn.rooms))
        told = True
        if conn.app.close_handler is not None:
            try:
                await conn.app.close_handler(conn)
            except ServiceUnavailable:
                logger.warning("redis unavailable while closing %s; telling later", conn.id)
                told = False
            except Exception:
                logger.exception("on_close failed on connection %s", conn.id)
        try:
            await self.hub.remove(conn)
        except ServiceUnavailable:
            self.keeper.removal_failed(conn.id, conn.user_id, rooms, told=told)
            return
        if not told:
            self.keeper.left_untold(conn.user_id, list(rooms))

    async def drain(self) -> None:
        """Wait for every registration and every handler that is waiting, `on_close`
        included, to finish."""
        while self.running or self.hub.background or self.registering:
            await asyncio.gather(
                *self.running, *self.hub.background, *self.registering, return_exceptions=True
            )

    # Outcomes of tasks

    def task_outcome(self, cid: str, outcome: Outcome) -> None:
        """A task dispatched from `cid` (or a closed connection of its user) ended."""
        conn = self.hub.local.get(cid)
        if conn is None:
            return  # gone since: the outcome stays readable with task_status
        handler = self.app.task_result_handler
        if handler is None:
            message = outcome.client_message()
            counters.sent(message["type"])
            payload = protocol.encode(message)
            conn.push(protocol.frame(payload), payload, True)
        else:
            what = f"on_task_result for task {outcome.task_id}"
            self.hub.spawn(_hook(handler(conn, outcome), what))

    # Departures the application tells

    def departed(self, departed: Departures) -> None:
        """Run the application's `on_departed` for each (user, rooms)."""
        handler = self.app.departed_handler
        if handler is None:
            return
        for user, rooms in departed:
            self.hub.spawn(_hook(handler(self.hub, user, rooms), f"on_departed for user {user}"))


async def _hook(call: Awaitable[None], what: str) -> None:
    """Run an application hook that belongs to no connection's order (`on_departed`,
    `on_task_result`) as a background task: what it raises is logged, never lost."""
    try:
        await call
    except ServiceUnavailable:
        logger.warning("redis unavailable in %s", what)
    except Exception:
        logger.exception("%s failed", what)
