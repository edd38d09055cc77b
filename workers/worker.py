"""One WebSocket worker process: its own SO_REUSEPORT listener, uvloop, websockets.

The master forks it and calls `run()`, whose return value is the exit status. A worker
that cannot start exits with `EXIT_BOOT`, which tells the master to stop instead of
respawning it forever.
"""

from __future__ import annotations

import asyncio
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
from shoal.server import app as app_api
from shoal.server import protocol
from shoal.server.errors import BootError, ProtocolError, ServiceUnavailable
from shoal.server.protocol import CloseCode
from shoal.server.scoreboard import Scoreboard
from shoal.workers import http
from shoal.workers.bus import Bus
from shoal.workers.connection import Connection, Socket, close_socket
from shoal.workers.hub import Hub
from shoal.workers.keys import Keys
from shoal.workers.registry import Registry, connect
from shoal.workers.resp import RedisAddress

logger = logging.getLogger(__name__)

EXIT_BOOT = 3
_USER_ID = re.compile(r"[\w.@:+-]{1,128}")
_BEAT_PERIOD = 1.0


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
    node_id: str
    redis_url: str
    scoreboard: Scoreboard
    master_pid: int


class Worker:
    def __init__(self, placement: Placement) -> None:
        config = self.config = placement.config
        self.slot = placement.slot
        self.node_id = placement.node_id
        self.redis_url = placement.redis_url
        self.scoreboard = placement.scoreboard
        self.master_pid = placement.master_pid
        self.id = worker_id(self.node_id, self.slot, os.getpid())
        self.app = app_api.load(config.app.module, config.app.settings)
        self.sequence = 0
        self.redis_state_up = True
        self.unremoved: set[str] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        # Ctrl-C reaches the whole process group: the master alone decides what follows.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        keys = Keys(config.redis.prefix)
        client = connect(self.redis_url)
        registry = Registry(client, keys, self.node_id, self.id)
        bus = Bus(RedisAddress.from_url(self.redis_url), self._on_bus_messages, self._on_bus_state)
        self.hub = Hub(
            keys,
            registry,
            bus,
            buffer_limit=config.server.buffer_output_size,
            close_timeout=config.server.close_timeout,
        )
        self.hub.on_departed = self._departed
        await bus.start()
        if not bus.up:
            raise BootError(f"redis: cannot reach {bus.address}")
        await bus.subscribe(keys.bus_all)
        await bus.subscribe(self.hub.worker_channel)
        await self._refresh_heartbeat()
        server = await self._listen()
        self.scoreboard.set_ready(self.slot)
        logger.info(
            "worker %s serving ws://%s:%d%s",
            self.id,
            config.server.host,
            config.server.port,
            config.server.path,
        )
        loops = [
            asyncio.create_task(self._beat(), name="beat"),
            asyncio.create_task(self._redis_heartbeat(), name="redis-heartbeat"),
        ]
        if config.server.heartbeat_check_interval:
            loops.append(asyncio.create_task(self._keepalive(), name="keepalive"))
        await self.stopping.wait()
        await self._shutdown(server)
        for task in loops:
            task.cancel()
        await bus.close()
        await client.close()
        return 0

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

    def _health(self) -> tuple[bool, dict[str, Any]]:
        redis_up = self.hub.bus.up and self.redis_state_up
        return redis_up, {
            "status": "ok" if redis_up else "redis unreachable",
            "node": self.node_id,
            "worker": self.id,
            "workers_alive": self.scoreboard.workers_alive(),
            "worker_num": self.config.server.worker_num,
            "redis": redis_up,
            "connections": self.scoreboard.connections(),
        }

    def _admit(self) -> str | None:
        if self.scoreboard.connections() >= self.config.server.max_connection:
            return "server full: max_connection reached"
        if not (self.hub.bus.up and self.redis_state_up):
            return "redis unreachable; retry later"
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
            await close_socket(
                socket, CloseCode.TRY_AGAIN_LATER, "redis unavailable", hub.close_timeout
            )
            return
        self.scoreboard.set_connections(self.slot, len(hub.local))
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
        except ProtocolError as exc:
            await conn.send({"type": "error", "message": str(exc)})
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("handler failed on connection %s", conn.id)
            await conn.send({"type": "error", "message": "Internal error"})

    async def _forget(self, conn: Connection) -> None:
        if self.app.close_handler is not None:
            try:
                await self.app.close_handler(conn)
            except ServiceUnavailable:
                logger.warning("redis unavailable while closing %s", conn.id)
            except Exception:
                logger.exception("on_close failed on connection %s", conn.id)
        try:
            await self.hub.remove(conn)
        except ServiceUnavailable:
            # Retried by the Redis heartbeat, so no ghost outlives the outage.
            self.unremoved.add(conn.id)
        self.scoreboard.set_connections(self.slot, len(self.hub.local))

    # Background loops

    async def _beat(self) -> None:
        while True:
            self.scoreboard.beat(self.slot, time.monotonic())
            if os.getppid() != self.master_pid:
                logger.error("master process is gone; stopping")
                self.stopping.set()
            await asyncio.sleep(_BEAT_PERIOD)

    async def _redis_heartbeat(self) -> None:
        period = self.config.redis.heartbeat_ttl / 3
        while True:
            await asyncio.sleep(period)
            await self._refresh_heartbeat()

    async def _refresh_heartbeat(self) -> None:
        registry = self.hub.registry
        try:
            if not await registry.heartbeat(self.config.redis.heartbeat_ttl):
                snapshots = [conn.snapshot() for conn in self.hub.local.values()]
                if snapshots:
                    logger.warning(
                        "redis lost this worker's state; writing back %d connections",
                        len(snapshots),
                    )
                await registry.resync(snapshots)
                self.unremoved.clear()
            for cid in list(self.unremoved):
                await registry.remove_connection(cid)
                self.unremoved.discard(cid)
        except ServiceUnavailable:
            if self.redis_state_up:
                logger.warning("redis unreachable at %s; retrying", self.redis_url)
            self.redis_state_up = False
            return
        if not self.redis_state_up:
            logger.info("redis reachable again")
        self.redis_state_up = True

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

    async def _shutdown(self, server: Server) -> None:
        """Stop accepting, close every client with 1001, remove this worker's state."""
        timeout = self.config.server.shutdown_timeout
        logger.info("worker %s stopping: closing %d connections", self.id, len(self.hub.local))
        server.close(close_connections=False)
        closing = [
            close_socket(
                conn.socket,
                CloseCode.GOING_AWAY,
                "server shutting down",
                self.config.server.close_timeout,
            )
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
    try:
        return uvloop.run(Worker(placement).run())
    except BootError as exc:
        logger.error("worker %d cannot start: %s", placement.slot, exc)
        return EXIT_BOOT
