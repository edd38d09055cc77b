"""One WebSocket worker process: its own SO_REUSEPORT listener on uvloop, its clients.

The master forks it and calls `run()`, whose return value is the exit status:

- 0: it was told to stop (SIGTERM) and did.
- `EXIT_BOOT` (3): it cannot start for a reason that retrying does not fix (the port is
  taken, the application does not import). The master stops the node instead of
  respawning it forever.
- `EXIT_FAILED` (4): one of its background loops died. The master respawns it.

A worker that starts while Redis is unreachable waits for it, beating the scoreboard so
the master knows it is alive, and listens only once Redis answers: a Redis outage never
stops a node.

It accepts on its slot's listening sockets, which the master opened and keeps
(`shoal.server.listeners`). Told to stop (SIGTERM), it stops accepting and closes its
clients with the code the master put in its seat: 1001 when the node stops, at once;
1012 when it is replaced, spread over `server.reload_grace` so that its clients do not
all reconnect in the same instant. When its slot is removed it is the last holder of
its listener, and first accepts what the listener's queue holds (`drain`).

The parts: `transport` (each TCP connection, on websockets' sans-I/O core), `sessions`
(each client's life, the application's handlers), `hub` (local rooms, delivery across
the cluster), `keeper` (this worker's state in Redis).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from shoal.config.model import AuthConfig
from shoal.core import app as app_api
from shoal.core import history, loops, metrics, protocol
from shoal.core import task as task_api
from shoal.core.auth import Policy, RoomRule, select_subprotocol
from shoal.core.backoff import full_jitter
from shoal.core.bus import Backlogs, Bus
from shoal.core.errors import BootError, ConfigError, ServiceUnavailable
from shoal.core.keys import Keys
from shoal.core.placement import Placement as ChildPlacement
from shoal.core.registry import Registry, connect
from shoal.core.resp import RedisAddress, Timeouts
from shoal.core.schema import ADVICE, CloseCode
from shoal.workers import demo, exposition, gate, http, pusher, pusherapi, tls, transport
from shoal.workers.addresses import Addresses
from shoal.workers.admission import Admission
from shoal.workers.dispatcher import Tasks
from shoal.workers.hub import Hub
from shoal.workers.keeper import Keeper
from shoal.workers.ratelimit import Rates
from shoal.workers.sessions import Sessions

logger = logging.getLogger(__name__)

EXIT_BOOT = 3
EXIT_FAILED = 4
_WAIT_LOG_EVERY = 10.0


def worker_id(node_id: str, slot: int, pid: int) -> str:
    """Unique across nodes and respawns: a new process in the same slot gets a new id."""
    return f"{node_id}.{slot}.{pid}"


@dataclass(frozen=True, slots=True)
class Placement(ChildPlacement):
    """What the master gives a worker it forks: its slot, and the slot's listeners."""

    slot: int
    listeners: tuple[socket.socket, ...]
    admin_listeners: tuple[socket.socket, ...] = ()


def policy(app: app_api.App, config: AuthConfig) -> Policy:
    """What each role may do: the application's declared roles, then `auth.*`.

    With authentication off, every connection is a `user`: `presence` of the whole
    deployment stays open to it, as before authentication existed.
    """
    return Policy(
        app.roles,
        config.roles,
        [RoomRule(rule.pattern, frozenset(rule.roles)) for rule in config.rooms],
        config.presence_all if config.enabled else None,
    )


class Worker:
    def __init__(self, placement: Placement) -> None:
        self.config = placement.config
        self.slot = placement.slot
        self.seat = placement.seat
        self.node_id = placement.node_id
        self.redis_url = placement.redis_url
        self.scoreboard = placement.scoreboard
        self.master_pid = placement.master_pid
        self.listeners = placement.listeners
        self.admin_listeners = placement.admin_listeners
        self.id = worker_id(self.node_id, self.slot, os.getpid())
        self.app = app_api.load(self.config.app.module, self.config.app.settings)
        self.timeouts = Timeouts.from_config(self.config.redis)
        self.admission = Admission(self.scoreboard, self.seat, self.config.server.max_connection)
        server = self.config.server
        self.demo = demo.load(server, self.config.auth) if server.demo_page else None
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        # Ctrl-C reaches the whole process group: the master alone decides what follows.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        beat = asyncio.create_task(
            loops.beat(self.scoreboard, self.seat, self.master_pid, self.stopping), name="beat"
        )
        keys = Keys(config.redis.prefix)
        client = connect(self.redis_url, self.timeouts)
        bus = Bus(
            RedisAddress.from_url(self.redis_url),
            self._on_bus_messages,
            self._on_bus_state,
            self.timeouts,
            Backlogs(
                publish=config.limits.publish_backlog,
                subscriber=config.limits.subscriber_backlog,
                name=keys.bus_client(self.id),
                peers=keys.bus_clients,
            ),
        )
        self.tasks = Tasks(
            keys,
            RedisAddress.from_url(self.redis_url),
            self.timeouts,
            task_api.load(config.tasks.modules),
            config.tasks.max_pending,
        )
        self.hub = Hub(
            keys,
            Registry(client, keys, self.node_id, self.id),
            bus,
            self.tasks,
            buffer_limit=config.server.buffer_output_size,
            close_timeout=config.server.close_timeout,
            max_metadata_bytes=config.limits.max_metadata_bytes,
            max_rooms=config.limits.max_rooms,
            max_channels=config.limits.max_channels,
            policy=policy(self.app, config.auth),
            history=history.Rules(
                [history.Rule(r.rooms, r.size, r.ttl) for r in config.app.history]
            ),
        )
        self.gate = gate.Gate(
            config.auth,
            keys,
            gate.verifier(config.auth),
            Addresses(config.server, config.limits, keys, self.id),
        )
        self.keeper = Keeper(
            self.hub, config.redis, self._tell, self.scoreboard.redis_up_everywhere
        )
        endpoint = None
        if config.pusher.enabled:
            endpoint = pusher.Pusher(
                config.pusher,
                self.hub,
                max_channels=config.limits.max_channels,
                max_pending=config.tasks.max_pending,
            )
            self.keeper.on_left = endpoint.left
        self.sessions = Sessions(
            self.id,
            self.app,
            self.hub,
            self.keeper,
            self.admission,
            http.router(
                config.server.path,
                self._healthy,
                self._admit,
                self.demo,
                pusher_prefix=pusher.PATH_PREFIX if config.pusher.enabled else None,
            ),
            self.gate,
            rates=Rates.from_config(config.limits),
            log_connections=config.log.connections,
            pusher=endpoint,
            responder=None if endpoint is None else pusherapi.Api(config.pusher, self.hub),
        )
        self.hub.on_departed = self.sessions.departed
        self.tasks.on_outcome = self.sessions.task_outcome
        await bus.start()
        status = 0
        if await self._wait_for_redis():
            servers = await self._listen()
            self.scoreboard.set_ready(self.seat)
            logger.info(
                "worker %s serving %s://%s:%d%s",
                self.id,
                tls.scheme(config.server),
                config.server.host,
                config.server.port,
                config.server.path,
            )
            background = [
                beat,
                asyncio.create_task(self.keeper.run(), name="redis-heartbeat"),
                *bus.tasks,
            ]
            if config.server.heartbeat_check_interval:
                background.append(asyncio.create_task(self._keepalive(), name="keepalive"))
            background.append(asyncio.create_task(self._progress(), name="progress"))
            if not self.gate.keys_loaded:  # a JWKS to fetch, and to refresh
                background.append(asyncio.create_task(self.gate.keep_keys(), name="jwks"))
            if await loops.until_stopped(self.stopping, background, f"worker {self.id}"):
                # The master says how clients should take it: 1001 for a stop, 1012 when
                # this worker is replaced.
                code = CloseCode(self.scoreboard.close_code(self.seat) or CloseCode.GOING_AWAY)
            else:
                status, code = EXIT_FAILED, CloseCode.INTERNAL_ERROR
            await self._shutdown(servers, code)
        await self.tasks.close()
        beat.cancel()
        await bus.close()
        await client.close()
        # What was counted since the last beat, the clients' closes included.
        self.scoreboard.metrics.publish(self.seat, metrics.counters)
        return status

    def _tell(self, departed: list[tuple[str, list[str]]]) -> None:
        self.sessions.departed(departed)

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
                    await self.keeper.refresh(strict=True)
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

    async def _listen(self) -> list[asyncio.Server]:
        server = self.config.server
        settings = transport.Settings.make(
            max_size=server.max_message_size,
            max_buffer=server.buffer_output_size,
            open_timeout=server.handshake_timeout,
            close_timeout=server.close_timeout,
            compression=server.websocket_compression,
            inflate_rate=server.websocket_inflate_rate,
            allowed_origins=server.allowed_origins,
            select_subprotocol=select_subprotocol,
        )
        self.factory = transport.factory(self.sessions, settings)
        # Plain HTTP, never TLS: the admin listener is for this host or a private network.
        admin = transport.factory(
            http.Admin(
                self._health, server.metrics_path, exposition.page(self.scoreboard, self.seat)
            ),
            settings,
        )
        loop = asyncio.get_running_loop()
        try:
            secure = tls.context(server)  # the certificate as the files are now
            return [
                *[
                    await loop.create_server(
                        self.factory,
                        sock=sock,
                        backlog=server.backlog,
                        ssl=secure,
                        ssl_handshake_timeout=server.handshake_timeout if secure else None,
                    )
                    for sock in self.listeners
                ],
                *[await loop.create_server(admin, sock=sock) for sock in self.admin_listeners],
            ]
        except OSError as exc:
            raise BootError(
                f"cannot listen on {server.host}:{server.port}: {exc.strerror}"
            ) from exc
        except ConfigError as exc:  # the certificate went away since the master checked
            raise BootError(str(exc)) from exc

    # HTTP hooks

    def _healthy(self) -> bool:
        """Redis reachable, not stalled, and this worker's state kept fresh in it."""
        bus = self.hub.bus
        return bus.up and not bus.stalled and self.keeper.fresh

    def _health(self) -> tuple[bool, dict[str, Any]]:
        """`/healthz` of the admin listener: health and the node's details."""
        healthy = self._healthy()
        return healthy, {
            "node": self.node_id,
            "worker": self.id,
            "workers_alive": self.scoreboard.workers_alive(),
            "worker_num": self.config.server.worker_num,
            "redis": healthy,
            "state_age": round(self.keeper.age, 1),
            "connections": self.scoreboard.connections(),
        }

    def _admit(self, ws: transport.WebSocket) -> str | None:
        if not self._healthy():
            return "redis unreachable; retry later"
        if not self.admission.admit():
            return "server full: max_connection reached"
        ws.admitted = True  # released when its transport is gone
        return None

    # Background loops

    async def _keepalive(self) -> None:
        """Ping clients silent for a check interval; close those silent for the idle time."""
        interval = self.config.server.heartbeat_check_interval
        idle_time = self.config.server.heartbeat_idle_time
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.hub.local.values()):
                ws = conn.ws
                if conn.busy or ws.reading_paused:
                    # This server is behind, not the client: a handler waits (for Redis,
                    # say) and what the client sent waits unread. Its silence is ours.
                    ws.last_seen = now
                    continue
                silent = now - ws.last_seen
                if silent >= idle_time:
                    conn.close_soon(CloseCode.IDLE_TIMEOUT, "idle timeout")
                elif silent >= interval and ws.is_open:
                    ws.write(protocol.PING_FRAME)

    async def _progress(self) -> None:
        """Publish whether Redis answers; ask to be replaced once `server.max_request`
        (plus this worker's jitter) messages were handled."""
        server = self.config.server
        limit = server.max_request + random.randint(0, server.max_request_jitter)
        asked = not server.max_request
        while True:
            self.scoreboard.set_redis_up(self.seat, self._healthy())
            if not asked:
                # Every message a client sent, as `/metrics` counts it.
                handled = sum(metrics.counters.messages_in.values())
                if handled >= limit:
                    asked = True
                    logger.info(
                        "worker %s handled %d messages (server.max_request); asking to be replaced",
                        self.id,
                        handled,
                    )
                    self.scoreboard.request_recycle(self.seat)
            await asyncio.sleep(loops.BEAT_PERIOD)

    def _on_bus_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        self.hub.deliver(messages)

    def _on_bus_state(self, up: bool) -> None:
        if up:
            logger.info("redis bus connected")
            # Redis may have come back empty: check now rather than at the next beat.
            self.hub.spawn(self.keeper.refresh())

    async def _shutdown(self, servers: list[asyncio.Server], code: CloseCode) -> None:
        """Stop accepting, close every client with `code`, remove this worker's state.

        Replaced (1012), it spreads the closes over `server.reload_grace`.
        """
        timeout = self.config.server.shutdown_timeout
        grace = self.config.server.reload_grace if code == CloseCode.SERVICE_RESTART else 0.0
        self.sessions.closing = code
        if self.scoreboard.drain(self.seat):
            self._drain()
        for server in servers:
            server.close()
        self.sessions.exchanges.close()
        sockets = list(self.sessions.open)
        logger.info(
            "worker %s stopping: closing %d connections with %d%s",
            self.id,
            len(sockets),
            code,
            f" over {grace:g} s" if grace and sockets else "",
        )
        loop = asyncio.get_running_loop()
        for ws in sockets:
            if grace:
                loop.call_later(random.uniform(0, grace), self._close, ws, code)
            else:
                self._close(ws, code)
        try:
            async with asyncio.timeout(grace + timeout * 0.8):
                # Each closes within close_timeout, or is dropped then. A handshake
                # under way completes, then ends in a close too (`Sessions.closing`):
                # it was accepted, and is not to be reset.
                sessions = self.sessions
                while sessions.open or sessions.handshaking or sessions.registering:
                    await asyncio.gather(
                        *(ws.wait_closed() for ws in [*sessions.open, *sessions.handshaking])
                    )
                    await sessions.drain()
                # The plain HTTP requests under way (the Pusher HTTP API's) are answered.
                await sessions.exchanges.wait_answered()
                await self.hub.registry.forget_worker(self.id)
        except (TimeoutError, ServiceUnavailable) as exc:
            logger.warning("worker %s stopped before its state was removed: %r", self.id, exc)

    @staticmethod
    def _close(ws: transport.WebSocket, code: CloseCode) -> None:
        reason = ADVICE[code].reason
        if ws.session is not None:
            ws.session.close_soon(code, reason)
        else:
            ws.close(code, reason)

    def _drain(self) -> None:
        """Accept what the listeners' queues hold: this worker is their last holder, and
        closing them would reset those connections (`net.ipv4.tcp_migrate_req` aside)."""
        loop = asyncio.get_running_loop()
        drained = 0
        for listener in self.listeners:
            while True:
                try:
                    sock, _ = listener.accept()
                except OSError:  # BlockingIOError once empty
                    break
                drained += 1
                self.hub.spawn(self._adopt(loop, sock))
        if drained:
            logger.info("worker %s accepted %d queued connections before closing", self.id, drained)

    async def _adopt(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        await loop.connect_accepted_socket(self.factory, sock)


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
