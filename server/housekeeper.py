"""The node's housekeeper: a child process that keeps Redis clean on the master's behalf.

The master never talks to Redis once it has forked: a hung Redis must not delay reaping,
respawning or acting on a signal. Whatever the master learns that Redis must hear goes
to this process through a pipe, one line per event, and it does the Redis work here:

- a worker of this node died: remove its connections' state at once (its heartbeat key
  would only expire after `redis.heartbeat_ttl`);
- every `redis.heartbeat_ttl / 2` seconds: sweep workers of any node whose heartbeat
  expired (a whole node died);
- after either: have a live worker of this node run the application's `on_departed` for
  the connections removed, through the `AsyncEmitter`, so that their rooms are told.

Nothing is dropped while Redis is away: dead workers and untold departures are kept and
retried, with jittered backoff, until Redis answers.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import time
from dataclasses import dataclass

import redis
import uvloop

from shoal.core import loops, metrics, pushstate, webhooks
from shoal.core.backoff import full_jitter
from shoal.core.emitter import AsyncEmitter
from shoal.core.errors import ServiceUnavailable
from shoal.core.keys import Keys
from shoal.core.placement import Placement as ChildPlacement
from shoal.core.registry import Departure, Registry, connect
from shoal.core.resp import Timeouts

logger = logging.getLogger(__name__)

_RedisFailure = (ServiceUnavailable, redis.RedisError, OSError)


@dataclass(frozen=True, slots=True)
class Placement(ChildPlacement):
    """What the master gives the housekeeper it forks."""

    inbox: int
    """The read end of the master's pipe: one dead worker id per line."""


class Housekeeper:
    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        config = placement.config
        self.registry = Registry(
            connect(placement.redis_url, Timeouts.from_config(config.redis)),
            Keys(config.redis.prefix),
            placement.node_id,
        )
        self.emitter = AsyncEmitter(placement.redis_url, config.redis.prefix)
        self.dead: list[str] = []
        self.untold: list[Departure] = []
        # Pusher subscriptions the clean-ups removed, whose presence channels are to hear
        # of members that left (`pushstate.removed_notice`).
        self.unannounced: list[pushstate.Left] = []
        self.stopping = asyncio.Event()
        self.work = asyncio.Event()
        self._partial = b""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_reader(self.placement.inbox, self._read)
        self.placement.scoreboard.set_ready(self.placement.seat)
        placement = self.placement
        background = [
            asyncio.create_task(
                loops.beat(
                    placement.scoreboard, placement.seat, placement.master_pid, self.stopping
                ),
                name="beat",
            ),
            asyncio.create_task(self._clean(), name="clean"),
            asyncio.create_task(self._sweep(), name="sweep"),
        ]
        status = 0 if await loops.until_stopped(self.stopping, background, "housekeeper") else 1
        for task in background:
            task.cancel()
        await self.registry.redis.close()
        await self.emitter.close()
        placement.scoreboard.metrics.publish(placement.seat, metrics.counters)
        return status

    def _read(self) -> None:
        try:
            data = os.read(self.placement.inbox, 65536)
        except BlockingIOError:
            return
        if not data:  # the master is gone
            asyncio.get_running_loop().remove_reader(self.placement.inbox)
            self.stopping.set()
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.dead += [line.decode() for line in lines if line]
        self.work.set()

    async def _clean(self) -> None:
        """Forget dead workers and tell departures, retrying until Redis answers."""
        attempt = 0
        while True:
            if not (self.dead or self.untold or self.unannounced):
                await self.work.wait()
            self.work.clear()
            try:
                while self.dead:
                    wid = self.dead[0]
                    self._departed(await self.registry.forget_worker(wid))
                    self.dead.pop(0)
                if self.unannounced:
                    await self.emitter.tell_left(self.unannounced)
                    await self._webhooks(self.unannounced)
                    self.unannounced = []
                if self.untold:
                    await self._tell()
                attempt = 0
            except _RedisFailure as exc:
                delay = full_jitter(attempt, 0.2, 5.0)
                if attempt == 0:
                    logger.warning("redis unavailable for clean-up (%r); retrying", exc)
                attempt += 1
                await asyncio.sleep(delay)
                self.work.set()

    async def _tell(self) -> None:
        """Have a live worker of this node tell the rooms of `untold` departures.

        With none ready (a one-worker node whose worker is being respawned), they wait.
        """
        workers = await self.registry.node_workers()
        if not workers:
            await asyncio.sleep(loops.BEAT_PERIOD)
            self.work.set()
            return
        untold, self.untold = self.untold, []
        try:
            await self.emitter.tell_departed(workers[0], ((d.user, d.rooms) for d in untold))
        except BaseException:
            self.untold = untold + self.untold
            raise

    async def _sweep(self) -> None:
        """Sweep workers whose heartbeat expired, on any node, once sure they are dead.

        A worker is swept only when its heartbeat is still missing a heartbeat period
        after it was first seen missing. After Redis itself stalled or was busy for
        longer than the heartbeat TTL, every key expired at once: the first sweep after
        it would otherwise take the state of live workers that were about to beat again,
        and tell their rooms they left.
        """
        ttl = self.placement.config.redis.heartbeat_ttl
        suspects: dict[str, float] = {}
        while True:
            await asyncio.sleep(ttl / 2)
            try:
                missing = await self.registry.expired()
                now = time.monotonic()
                # Workers beat every ttl / 3; give them that and half as much again.
                confirmed = {w for w in missing if now - suspects.get(w, now) >= ttl / 2}
                suspects = {w: suspects.get(w, now) for w in missing}
                swept = await self.registry.sweep(only=confirmed) if confirmed else {}
            except _RedisFailure as exc:
                logger.debug("redis unavailable; sweep skipped: %r", exc)
                continue
            if swept:
                logger.info("swept state of dead workers: %s", ", ".join(swept))
                self._departed([d for departed in swept.values() for d in departed])
                self.work.set()

    async def _webhooks(self, lefts: list[pushstate.Left]) -> None:
        """Queue the webhooks of Pusher subscriptions a clean-up removed."""
        config = self.placement.config
        apps = {app.id: app for app in config.pusher.apps if app.webhooks}
        now = time.time()
        commands = [
            command
            for left in lefts
            if left.app in apps
            for command in webhooks.dispatches(
                self.registry.keys, apps[left.app], webhooks.left(left), now,
                config.tasks.max_pending,
            )
        ]  # fmt: skip
        if commands:
            await self.registry.redis.pipeline(commands)

    def _departed(self, departures: list[Departure]) -> None:
        """Connections a clean-up removed: their rooms and presence channels are to hear."""
        self.untold += departures
        self.unannounced += [left for departure in departures for left in departure.pushed]


def run(placement: Placement) -> int:
    """Run the housekeeper in this (freshly forked) process. Returns its exit status."""
    faulthandler.enable()
    return uvloop.run(Housekeeper(placement).run())
