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
class WorkerResult:
    """Everything one process measured after its connections were up."""

    drops: Counter[str] = field(default_factory=Counter)
    traffic: DriverReport | None = None


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

    # MessageSink ------------------------------------------------------------

    def on_message(self, client: Client, payload: bytes) -> None:
        if self.driver is not None:
            self.driver.on_message(client, payload)

    def on_disconnect(self, client: Client) -> None:
        handshake = client.transport.close_handshake if client.transport else None
        received = handshake.recv if handshake is not None else None
        cause = f"close_{int(received.code.value)}" if received is not None else "dropped"
        self.drops[cause] += 1
        self.clients.pop(client.index, None)

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
            joining = self._subscribe(client) if plan.protocol == "pusher" else self._join(client)
            cause = await joining
            if cause is not None:
                client.close()
                client = None
        if client is None:
            report.failures[cause or "unknown"] += 1
            return
        report.connected += 1
        report.handshake.record(elapsed)
        self.clients[index] = client

    async def _join(self, client: Client) -> str | None:
        """Join the fanout's room; None once joined, else the failure's cause."""
        joined = client.expect(schema.JoinedRoom)
        join: schema.ClientJoinRoom = {"type": "join_room", "room": self.plan.room}
        client.send(orjson.dumps(join))
        try:
            async with asyncio.timeout(self.plan.connect_timeout):
                await joined
        except (TimeoutError, ConnectionError):
            return "join_failed"
        return None

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
        await asyncio.sleep(max(0.0, (t0_ns - time.monotonic_ns()) / 1e9))
        driver.start()
        progress = asyncio.get_running_loop().create_task(self._traffic_progress(meter))
        await asyncio.sleep(max(0.0, (meter.window_end - time.monotonic_ns()) / 1e9))
        driver.stop()
        self.pipe.send(("sent", driver.sent_by_source()))
        command = await self.inbox.get()
        await driver.drain(command[1], time.monotonic() + plan.drain)
        progress.cancel()
        self.pipe.send(("result", WorkerResult(drops=self.drops, traffic=driver.report())))

    async def _traffic_progress(self, meter: Meter) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_S)
            self.pipe.send(("progress", meter.sent_total, meter.received_total))
