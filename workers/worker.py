"""One WebSocket worker process: its own SO_REUSEPORT listener, uvloop, websockets.

The master forks it and calls `run()`, whose return value is the exit status:

- 0: it was told to stop (SIGTERM) and did.
- `EXIT_BOOT` (3): it cannot start for a reason that retrying does not fix (the port is
  taken, the application does not import). The master stops the node instead of
  respawning it forever.
- `EXIT_FAILED` (4): one of its background loops died. The master respawns it.

A worker that starts while Redis is unreachable waits for it, beating the scoreboard so
the master knows it is alive, and listens only once Redis answers: a Redis outage never
stops a node.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs

import uvloop
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import OPEN

from shoal.config.model import Config
from shoal.core import app as app_api
from shoal.core import loops as loops_
from shoal.core import protocol
from shoal.core.backoff import full_jitter
from shoal.core.bus import Bus
from shoal.core.errors import BootError, ProtocolError, ServiceUnavailable
from shoal.core.keys import Keys
from shoal.core.registry import Registry, connect
from shoal.core.resp import RedisAddress, Timeouts
from shoal.core.schema import ADVICE, CloseCode
from shoal.core.scoreboard import Scoreboard
from shoal.workers import http
from shoal.workers.admission import Admission
from shoal.workers.connection import Connection, Socket, close_socket
from shoal.workers.hub import Hub

logger = logging.getLogger(__name__)

EXIT_BOOT = 3
EXIT_FAILED = 4
_USER_ID = re.compile(r"[\w.@:+-]{1,128}")
_WAIT_LOG_EVERY = 10.0


def worker_id(node_id: str, slot: int, pid: int) -> str:
    """Unique across nodes and respawns: a new process in the same slot gets a new id."""
    return f"{node_id}.{slot}.{pid}"


def user_from(path: str) -> str | None:
    """The `user_id` query parameter of the handshake, if any.

    Raises:
        ProtocolError: it is present but not 1-128 word characters (or `.@:+-`).
    """
    values = parse_qs(path.partition("?")[2]).get("user_id")
    if not values:
        return None
    if not _USER_ID.fullmatch(values[0]):
        raise ProtocolError("Invalid user_id")
    return values[0]


@dataclass(frozen=True, slots=True)
class Placement:
    """What the master gives a worker it forks."""

    config: Config
    slot: int
    seat: int
    node_id: str
    redis_url: str
    scoreboard: Scoreboard
    master_pid: int


@dataclass(frozen=True, slots=True)
class _Gone:
    """A connection whose Redis state could not be removed, or whose rooms were not told."""

    user: str
    rooms: tuple[str, ...]
    untold: bool


class Worker:
    def __init__(self, placement: Placement) -> None:
        config = self.config = placement.config
        self.slot = placement.slot
        self.seat = placement.seat
        self.node_id = placement.node_id
        self.redis_url = placement.redis_url
        self.scoreboard = placement.scoreboard
        self.master_pid = placement.master_pid
        self.id = worker_id(self.node_id, self.slot, os.getpid())
        self.app = app_api.load(config.app.module, config.app.settings)
        self.timeouts = Timeouts.from_config(config.redis)
        self.admission = Admission(self.scoreboard, self.seat, config.server.max_connection)
        self.sequence = 0
        # None until the first heartbeat: only a recovery is worth a log line.
        self.redis_state_up: bool | None = None
        self.state_beat = 0.0  # monotonic time of the last heartbeat Redis acknowledged
        self.gone: dict[str, _Gone] = {}
        self.untold: list[tuple[str, list[str]]] = []
        self.state_since = 0.0  # when the state was last found kept again after a failure
        self.stopping = asyncio.Event()
        self._heartbeat_lock = asyncio.Lock()

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        # Ctrl-C reaches the whole process group: the master alone decides what follows.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        beat = asyncio.create_task(
            loops_.beat(self.scoreboard, self.seat, self.master_pid, self.stopping), name="beat"
        )
        keys = Keys(config.redis.prefix)
        client = connect(self.redis_url, self.timeouts)
        registry = Registry(client, keys, self.node_id, self.id)
        bus = Bus(
            RedisAddress.from_url(self.redis_url),
            self._on_bus_messages,
            self._on_bus_state,
            self.timeouts,
        )
        self.hub = Hub(
            keys,
            registry,
            bus,
            buffer_limit=config.server.buffer_output_size,
            close_timeout=config.server.close_timeout,
        )
        self.hub.on_departed = self._departed
        await bus.start()
        status = 0
        if await self._wait_for_redis():
            server = await self._listen()
            self.scoreboard.set_ready(self.seat)
            logger.info(
                "worker %s serving ws://%s:%d%s",
                self.id,
                config.server.host,
                config.server.port,
                config.server.path,
            )
            loops = [
                beat,
                asyncio.create_task(self._redis_heartbeat(), name="redis-heartbeat"),
                *bus.tasks,
            ]
            if config.server.heartbeat_check_interval:
                loops.append(asyncio.create_task(self._keepalive(), name="keepalive"))
            if await loops_.until_stopped(self.stopping, loops, f"worker {self.id}"):
                # The master says how clients should take it: 1001 for a stop.
                code = CloseCode(self.scoreboard.close_code(self.seat) or CloseCode.GOING_AWAY)
            else:
                status, code = EXIT_FAILED, CloseCode.INTERNAL_ERROR
            await self._shutdown(server, code)
        beat.cancel()
        await bus.close()
        await client.close()
        return status

    async def _wait_for_redis(self) -> bool:
        """Wait until the bus is up, subscribed, and the state heartbeat went through.

        Returns False if told to stop first.
        """
        keys = self.hub.keys
        started = last_log = time.monotonic()
        attempt = 0
        while not self.stopping.is_set():
            try:
                bus = self.hub.bus
                if bus.up:
                    for channel in (keys.bus_all, self.hub.worker_channel):
                        if channel not in bus.wanted:  # a retry keeps what went through
                            await bus.subscribe(channel)
                    await self._refresh_heartbeat(strict=True)
                    if time.monotonic() - started > 1:
                        logger.info("redis reachable; worker %s starting", self.id)
                    return True
            except ServiceUnavailable as exc:
                reason = str(exc)
            else:
                reason = "not connected"
            now = time.monotonic()
            if now - last_log >= _WAIT_LOG_EVERY or attempt == 2:
                logger.warning(
                    "worker %s waiting for redis at %s (%s); retrying",
                    self.id,
                    self.hub.bus.address,
                    reason,
                )
                last_log = now
            delay = full_jitter(attempt, 0.1, 2.0)
            attempt += 1
            try:
                async with asyncio.timeout(delay):
                    await self.stopping.wait()
            except TimeoutError:
                pass
        return False

    async def _listen(self) -> Server:
        server_config = self.config.server
        try:
            return await serve(
                self._handle,
                server_config.host,
                server_config.port,
                reuse_port=True,
                backlog=server_config.backlog,
                process_request=http.router(server_config.path, self._health, self._admit),
                compression="deflate" if server_config.websocket_compression else None,
                max_size=server_config.max_message_size,
                # Keepalive is one sweep per worker (see _keepalive), not a task per client.
                ping_interval=None,
                close_timeout=server_config.close_timeout,
                create_connection=Socket,
                server_header=None,
            )
        except OSError as exc:
            raise BootError(
                f"cannot listen on {server_config.host}:{server_config.port}: {exc.strerror}"
            ) from exc

    # HTTP hooks

    def _healthy(self) -> bool:
        """Redis reachable, not stalled, and this worker's state kept fresh in it."""
        fresh = time.monotonic() - self.state_beat < self.config.redis.heartbeat_ttl / 2
        bus = self.hub.bus
        return bus.up and not bus.stalled and bool(self.redis_state_up) and fresh

    def _health(self) -> tuple[bool, dict[str, Any]]:
        healthy = self._healthy()
        return healthy, {
            "status": "ok" if healthy else "redis unreachable",
            "node": self.node_id,
            "worker": self.id,
            "workers_alive": self.scoreboard.workers_alive(),
            "worker_num": self.config.server.worker_num,
            "redis": healthy,
            "state_age": round(time.monotonic() - self.state_beat, 1),
            "connections": self.scoreboard.connections(),
        }

    def _admit(self, connection: ServerConnection) -> str | None:
        if not self._healthy():
            return "redis unreachable; retry later"
        if not self.admission.admit():
            return "server full: max_connection reached"
        cast(Socket, connection).admission = self.admission  # released with the transport
        return None

    # One connection

    async def _handle(self, connection: ServerConnection) -> None:
        socket = cast(Socket, connection)  # serve(create_connection=Socket)
        hub = self.hub
        app = self.app
        path = socket.request.path if socket.request else ""
        try:
            user = user_from(path) or f"u-{secrets.token_hex(6)}"
        except ProtocolError as exc:
            await close_socket(socket, CloseCode.POLICY_VIOLATION, str(exc), hub.close_timeout)
            return
        self.sequence += 1
        conn = Connection(f"{self.id}.{self.sequence}", user, socket, hub, int(time.time() * 1000))
        try:
            await hub.add(conn)
        except ServiceUnavailable:
            # Part of its state may have been written: remove it once Redis answers.
            self.gone[conn.id] = _Gone(user, (), untold=False)
            await close_socket(
                socket, CloseCode.TRY_AGAIN_LATER, "redis unavailable", hub.close_timeout
            )
            return
        try:
            if app.open_handler is not None:
                await app.open_handler(conn)
            async for data in socket:
                await self._dispatch(conn, data)
        except ConnectionClosed:
            pass
        except ServiceUnavailable:
            await conn.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
        except ProtocolError as exc:
            await conn.close(CloseCode.POLICY_VIOLATION, str(exc))
        except Exception:
            logger.exception("connection %s failed", conn.id)
            await conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await self._forget(conn)

    async def _dispatch(self, conn: Connection, data: str | bytes) -> None:
        app = self.app
        try:
            if app.frame_handler is not None:
                await app.frame_handler(conn, data)
            elif isinstance(data, bytes):
                if app.binary_handler is None:
                    raise ProtocolError("Binary frames are not supported")
                await app.binary_handler(conn, data)
            else:
                message = protocol.parse(data)
                handler = app.handlers.get(message["type"], app.default_handler)
                if handler is None:
                    raise ProtocolError("Unknown message type")
                await handler(conn, message)
        except ServiceUnavailable:
            # Whatever Redis said stays in the log; the client learns it may retry.
            await conn.send({"type": "error", "message": ServiceUnavailable().args[0]})
        except ProtocolError as exc:
            await conn.send({"type": "error", "message": str(exc)})
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("handler failed on connection %s", conn.id)
            await conn.send({"type": "error", "message": "Internal error"})

    async def _forget(self, conn: Connection) -> None:
        """Run `on_close`, then remove the connection's state.

        If Redis fails on the way, nothing is lost: the removal is retried, and rooms
        `on_close` could not tell are told through `on_departed`, once Redis is back.
        """
        rooms = tuple(sorted(conn.rooms))
        told = True
        if self.app.close_handler is not None:
            try:
                await self.app.close_handler(conn)
            except ServiceUnavailable:
                logger.warning("redis unavailable while closing %s; telling later", conn.id)
                told = False
            except Exception:
                logger.exception("on_close failed on connection %s", conn.id)
        try:
            await self.hub.remove(conn)
        except ServiceUnavailable:
            self.gone[conn.id] = _Gone(conn.user_id, rooms, untold=not told)
            return
        if not told:
            self.untold.append((conn.user_id, list(rooms)))
            self._announce()

    # Background loops

    async def _redis_heartbeat(self) -> None:
        period = self.config.redis.heartbeat_ttl / 3
        while True:
            await asyncio.sleep(period)
            await self._refresh_heartbeat()

    async def _refresh_heartbeat(self, *, strict: bool = False) -> None:
        """Refresh this worker's heartbeat in Redis; write its state back if Redis lost
        it; then retry removals, repairs and announcements that failed earlier.

        Any Redis failure marks the state as not kept (health turns 503) and waits for
        the next beat; with `strict` it is raised instead.
        """
        async with self._heartbeat_lock:
            try:
                await self._keep_state()
            except ServiceUnavailable as exc:
                if self.redis_state_up:
                    logger.warning(
                        "redis at %s failed keeping this worker's state (%s); retrying",
                        self.hub.bus.address,
                        exc,
                    )
                self.redis_state_up = False
                if strict:
                    raise
                return
        if not self.redis_state_up:
            if self.redis_state_up is False:
                logger.info("this worker's state is kept in redis again")
            self.state_since = time.monotonic()
        self.redis_state_up = True
        self._announce()

    def _announce(self) -> None:
        """Tell the rooms of connections that closed during an outage, once it is safe.

        After Redis came back empty, every worker of every node writes its connections
        back at its own pace; a room's members are only known again once they all have.
        Waiting one heartbeat period after this worker's own recovery gives them that,
        so that no departure is dropped as if its room were empty.
        """
        period = self.config.redis.heartbeat_ttl / 3
        if not self.untold or not self.hub.bus.up:
            return
        if time.monotonic() - self.state_since < period:
            return
        untold, self.untold = self.untold, []
        logger.info("telling the rooms of %d connections that closed during an outage", len(untold))
        self._departed(untold)

    async def _keep_state(self) -> None:
        registry = self.hub.registry
        if not await registry.heartbeat(self.config.redis.heartbeat_ttl):
            snapshots = [conn.snapshot() for conn in self.hub.local.values()]
            if snapshots:
                logger.warning(
                    "redis lost this worker's state; writing back %d connections",
                    len(snapshots),
                )
            await registry.resync(snapshots)
        self.state_beat = time.monotonic()
        for cid, gone in list(self.gone.items()):
            await registry.remove_connection(cid)
            del self.gone[cid]
            if gone.untold:
                self.untold.append((gone.user, list(gone.rooms)))
        await self.hub.repair()

    async def _keepalive(self) -> None:
        """Ping clients silent for a check interval; close those silent for the idle time."""
        interval = self.config.server.heartbeat_check_interval
        idle_time = self.config.server.heartbeat_idle_time
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.hub.local.values()):
                socket = conn.socket
                silent = now - socket.last_seen
                if silent >= idle_time:
                    conn.close_soon(CloseCode.IDLE_TIMEOUT, "idle timeout")
                elif silent >= interval and socket.protocol.state is OPEN:
                    conn.transport.write(protocol.PING_FRAME)

    def _departed(self, departed: list[tuple[str, list[str]]]) -> None:
        handler = self.app.departed_handler
        if handler is None:
            return
        for user, rooms in departed:
            self.hub.spawn(self._run_departed(handler, user, rooms))

    async def _run_departed(
        self, handler: app_api.DepartedHandler, user: str, rooms: list[str]
    ) -> None:
        try:
            await handler(self.hub, user, rooms)
        except ServiceUnavailable:
            logger.warning("redis unavailable while telling the rooms of departed user %s", user)
        except Exception:
            logger.exception("on_departed failed for user %s", user)

    def _on_bus_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        self.hub.deliver(messages)

    def _on_bus_state(self, up: bool) -> None:
        if up:
            logger.info("redis bus connected")
            # Redis may have come back empty: check now rather than at the next beat.
            self.hub.spawn(self._refresh_heartbeat())

    async def _shutdown(self, server: Server, code: CloseCode) -> None:
        """Stop accepting, close every client with `code`, remove this worker's state."""
        timeout = self.config.server.shutdown_timeout
        logger.info(
            "worker %s stopping: closing %d connections with %d",
            self.id,
            len(self.hub.local),
            code,
        )
        server.close(close_connections=False)
        reason = ADVICE[code].reason
        closing = [
            close_socket(conn.socket, code, reason, self.config.server.close_timeout)
            for conn in list(self.hub.local.values())
        ]
        try:
            async with asyncio.timeout(timeout * 0.8):
                await asyncio.gather(*closing)
                await server.wait_closed()
                await self.hub.registry.forget_worker(self.id)
        except (TimeoutError, ServiceUnavailable) as exc:
            logger.warning("worker %s stopped before its state was removed: %r", self.id, exc)


def run(placement: Placement) -> int:
    """Run a worker in this (freshly forked) process. Returns its exit status."""
    # SIGABRT from the master (a stuck loop) prints every thread's traceback, from C, so
    # even a worker blocked in a system call shows where before it dies.
    faulthandler.enable()
    try:
        return uvloop.run(Worker(placement).run())
    except BootError as exc:
        logger.error("worker %d cannot start: %s", placement.slot, exc)
        return EXIT_BOOT
