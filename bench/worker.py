"""A load process: opens its slice of connections and runs the scenario's driver.

It follows the parent's phases over a pipe of pickled tuples:

* child -> ``("progress", a, b)`` now and then (connected/failed while
  connecting, then sent/received totals);
* child -> ``("ready", ConnectReport)``; parent -> ``("start", t0_ns)`` or ``("close",)``;
* child -> ``("sent", {source: count})``; parent -> ``("expect", {source: count})``;
* child -> ``("result", WorkerResult)``; parent -> ``("close",)``;
* child -> ``("error", text)`` on any unexpected exception.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson
import uvloop

from shoal.bench import pusherwire
from shoal.bench.client import Client, open_client
from shoal.bench.drivers import DRIVERS, Driver, DriverReport
from shoal.bench.histogram import LatencyHistogram
from shoal.bench.meter import Meter
from shoal.bench.plan import RunPlan
from shoal.core import schema

logger = logging.getLogger(__name__)

_PROGRESS_S = 0.5
# The timeline has about this many points over warmup + duration (for charts).
_TIMELINE_POINTS = 100
# --resume waits this long (uniformly drawn) before each attempt to reconnect: a reload
# closes many connections at once, and they should not all come back at the same moment.
_RESUME_DELAY_S = (0.05, 0.5)


@dataclass
class ConnectReport:
    """How opening one process's connections went."""

    attempted: int = 0
    connected: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    handshake: LatencyHistogram = field(default_factory=LatencyHistogram)
    first_start_ns: int = 0
    last_done_ns: int = 0


@dataclass
class ResumeReport:
    """How the connections that broke came back (``--resume``)."""

    broken: Counter[str] = field(default_factory=Counter)
    """Why connections broke, as ``drops`` counts it (``close_1012``, ``dropped``)."""
    reconnects: int = 0
    """Connections that came back and rejoined the room."""
    recovered: int = 0
    """Rejoins whose ``joined_room`` said ``recovered: true``."""
    not_recovered: Counter[str] = field(default_factory=Counter)
    """Rejoins that said otherwise, by their ``reason``: what they missed is lost."""
    failed: Counter[str] = field(default_factory=Counter)
    """Connections that did not come back within ``connect_timeout``, by the last cause."""
    resent: int = 0
    """Publishers' messages sent again: handed to a connection that broke, and proven by
    the resumed join's replay never to have reached the room."""

    def merge(self, other: ResumeReport) -> None:
        """Fold another process's report in."""
        self.broken.update(other.broken)
        self.reconnects += other.reconnects
        self.recovered += other.recovered
        self.not_recovered.update(other.not_recovered)
        self.failed.update(other.failed)
        self.resent += other.resent


@dataclass
class WorkerResult:
    """Everything one process measured after its connections were up."""

    drops: Counter[str] = field(default_factory=Counter)
    traffic: DriverReport | None = None
    resume: ResumeReport | None = None


def timeline_step_ns(plan: RunPlan) -> int:
    """Width of one timeline slot, shared by every process of a run."""
    return max(100_000_000, int((plan.warmup + plan.duration) * 1e9 / _TIMELINE_POINTS))


def worker_main(pipe: Connection, plan: RunPlan, indices: range) -> None:
    """Process entry point (must be importable for the ``spawn`` start method)."""
    try:
        uvloop.run(_Worker(pipe, plan, indices).run())
    except Exception:
        pipe.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, pipe: Connection, plan: RunPlan, indices: range) -> None:
        self.pipe = pipe
        self.plan = plan
        self.indices = indices
        self.clients: dict[int, Client] = {}
        self.driver: Driver | None = None
        self.drops: Counter[str] = Counter()
        self.connect = ConnectReport()
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.positions: dict[int, schema.RoomPosition] = {}
        self.resume = ResumeReport()
        self.resuming: dict[int, asyncio.Task[None]] = {}
        self.finished = False

    # MessageSink ------------------------------------------------------------

    def on_message(self, client: Client, payload: bytes) -> None:
        if self.driver is not None:
            self.driver.on_message(client, payload)

    def on_disconnect(self, client: Client) -> None:
        handshake = client.transport.close_handshake if client.transport else None
        received = handshake.recv if handshake is not None else None
        cause = f"close_{int(received.code.value)}" if received is not None else "dropped"
        index = client.index
        if index in self.resuming:
            return  # a reconnection that broke while joining: its attempt goes on
        if self.plan.resume and self.driver is not None and not self.finished:
            self.resume.broken[cause] += 1
            self.driver.away(index)
            self.resuming[index] = asyncio.get_running_loop().create_task(self._resume(index))
            return
        self.drops[cause] += 1
        self.clients.pop(index, None)

    # Phases -----------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._read_pipe)
        await self._open_all()
        self.pipe.send(("ready", self.connect))
        command = await self.inbox.get()
        if command[0] == "start" and self.plan.scenario != "connect":
            await self._traffic(command[1])
            command = await self.inbox.get()
        while command[0] != "close":
            command = await self.inbox.get()
        for client in list(self.clients.values()):
            client.close()
        # Let the close frames reach the server before the process exits.
        await asyncio.sleep(0.1)
        loop.remove_reader(self.pipe.fileno())

    def _read_pipe(self) -> None:
        while self.pipe.poll():
            self.inbox.put_nowait(self.pipe.recv())

    async def _open_all(self) -> None:
        plan = self.plan
        gate = asyncio.Semaphore(plan.connect_concurrency)
        per_process_rate = plan.rate / plan.processes if plan.scenario == "connect" else 0.0
        self.connect.first_start_ns = time.monotonic_ns()
        progress = asyncio.get_running_loop().create_task(self._connect_progress())

        async def one(position: int, index: int) -> None:
            if per_process_rate > 0:
                await asyncio.sleep(position / per_process_rate)
            async with gate:
                await self._open_one(index)

        await asyncio.gather(*(one(p, i) for p, i in enumerate(self.indices)))
        progress.cancel()
        self.connect.last_done_ns = time.monotonic_ns()

    async def _open_one(self, index: int) -> None:
        plan = self.plan
        report = self.connect
        report.attempted += 1
        client, cause, elapsed = await open_client(
            plan.url_for(index),
            index,
            self,
            plan.connect_timeout,
            plan.waits_for_welcome,
            pusher=plan.protocol == "pusher",
        )
        if client is not None and plan.scenario == "fanout":
            if plan.protocol == "pusher":
                cause = await self._subscribe(client)
            else:
                cause = self._position(index, await self._join(client))
            if cause is not None:
                client.close()
                client = None
        if client is None:
            report.failures[cause or "unknown"] += 1
            return
        report.connected += 1
        report.handshake.record(elapsed)
        self.clients[index] = client

    async def _join(
        self, client: Client, since: schema.RoomPosition | None = None
    ) -> schema.JoinedRoom | None:
        """Join the fanout's room, from ``since`` if given (a resume: the replay before
        the reply goes to the driver, as live messages do); the reply, or None if none came."""
        joined = client.expect(schema.JoinedRoom, forward=since is not None)
        join: schema.ClientJoinRoom = {"type": "join_room", "room": self.plan.room}
        if since is not None:
            join["since"] = since
        client.send(orjson.dumps(join))
        try:
            async with asyncio.timeout(self.plan.connect_timeout):
                return await joined
        except (TimeoutError, ConnectionError):
            return None

    def _position(self, index: int, joined: schema.JoinedRoom | None) -> str | None:
        """Note where connection ``index`` joined (``--resume``); None, else why it failed."""
        if joined is None:
            return "join_failed"
        if not self.plan.resume:
            return None
        offset, epoch = joined.get("offset"), joined.get("epoch")
        if not isinstance(offset, str) or not isinstance(epoch, str):
            return "room_without_history"  # --resume needs app.history to cover the room
        self.positions[index] = {"offset": offset, "epoch": epoch}
        return None

    async def _resume(self, index: int) -> None:
        """Reconnect connection ``index`` and rejoin its room from the last offset it saw,
        within ``connect_timeout``; a jittered delay before each attempt."""
        plan = self.plan
        driver = self.driver
        assert driver is not None  # only traffic's connections resume
        deadline = time.monotonic() + plan.connect_timeout
        cause = "timeout"
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(random.uniform(*_RESUME_DELAY_S))
                limit = max(0.0, deadline - time.monotonic())
                client, failure, _ = await open_client(
                    plan.url_for(index), index, self, limit, plan.waits_for_welcome
                )
                if client is None:
                    cause = failure or "unknown"
                    continue
                joined = await self._join(client, driver.positions.get(index))
                if joined is None:
                    cause = "join_failed"
                    client.close()
                    continue
                recovered = joined.get("recovered") is True
                if recovered:
                    self.resume.recovered += 1
                else:
                    self.resume.not_recovered[str(joined.get("reason", "no recovered"))] += 1
                self.resume.reconnects += 1
                self.resume.resent += driver.rejoined(client, recovered)
                self.clients[index] = client
                return
            self.resume.failed[cause] += 1
            self.clients.pop(index, None)
        finally:
            del self.resuming[index]

    async def _subscribe(self, client: Client) -> str | None:
        """Subscribe to the fanout's Pusher channel, signed with the app's secret; None
        once subscribed, else the failure's cause."""
        plan = self.plan
        # The plan checked both when it was made; the welcome gave the socket id.
        assert plan.pusher_secret is not None
        assert client.socket_id is not None
        answer = client.expect_event(
            pusherwire.SUBSCRIBED, pusherwire.SUBSCRIPTION_ERROR, pusherwire.ERROR
        )
        frame = pusherwire.subscribe(
            plan.pusher_key, plan.pusher_secret, client.socket_id, plan.channel
        )
        client.send(frame)
        try:
            async with asyncio.timeout(plan.connect_timeout):
                reply = await answer
        except (TimeoutError, ConnectionError):
            return "subscribe_failed"
        if reply.get("event") != pusherwire.SUBSCRIBED or reply.get("channel") != plan.channel:
            return "subscription_error"
        return None

    async def _connect_progress(self) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_S)
            failed = sum(self.connect.failures.values())
            self.pipe.send(("progress", self.connect.connected, failed))

    async def _traffic(self, t0_ns: int) -> None:
        plan = self.plan
        meter = Meter(t0_ns, plan.warmup, plan.duration, timeline_step_ns(plan))
        driver = self.driver = DRIVERS[plan.protocol, plan.scenario](
            plan, dict(self.clients), meter
        )
        driver.positions.update(self.positions)
        await asyncio.sleep(max(0.0, (t0_ns - time.monotonic_ns()) / 1e9))
        driver.start()
        progress = asyncio.get_running_loop().create_task(self._traffic_progress(meter))
        await asyncio.sleep(max(0.0, (meter.window_end - time.monotonic_ns()) / 1e9))
        driver.stop()
        self.pipe.send(("sent", driver.sent_by_source()))
        command = await self.inbox.get()
        deadline = time.monotonic() + plan.drain
        await driver.drain(command[1], deadline)
        if self.resuming:
            # Connections closed late (a reload spreads its closes over its grace) may
            # have missed nothing and still be on their way back: they have what is left
            # of the drain to come back.
            resuming = list(self.resuming.values())
            await asyncio.wait(resuming, timeout=max(0.0, deadline - time.monotonic()))
        progress.cancel()
        self.finished = True
        for task in list(self.resuming.values()):
            task.cancel()  # still away at the end: what it missed counts as lost
            self.resume.failed["away_at_end"] += 1
        resume = self.resume if plan.resume else None
        result = WorkerResult(drops=self.drops, traffic=driver.report(), resume=resume)
        self.pipe.send(("result", result))

    async def _traffic_progress(self, meter: Meter) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_S)
            self.pipe.send(("progress", meter.sent_total, meter.received_total))
