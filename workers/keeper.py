"""Keeping a worker's state in Redis: its heartbeat, and everything a Redis failure
left to do.

The worker's local state is the truth and Redis a projection of it. Every heartbeat
refreshes the worker's liveness key; finding it gone (Redis restarted empty, or a sweep
took it while Redis stalled) writes every local connection back. Then it finishes what
failed earlier: removals of connections that closed while Redis was away, memberships
a failed join or leave half-wrote, and announcements `on_close` could not make.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shoal.config.model import RedisConfig
from shoal.core import pushstate
from shoal.core.errors import ServiceUnavailable
from shoal.workers.hub import Hub

logger = logging.getLogger(__name__)

Departures = list[tuple[str, list[str]]]


@dataclass(frozen=True, slots=True)
class _Gone:
    """A connection whose Redis state is still to be removed."""

    user: str
    rooms: tuple[str, ...]
    untold: bool
    """Its rooms were not told (`on_close` could not reach Redis)."""


class Keeper:
    """The state-keeping of one worker.

    Args:
        hub: the worker's hub (its local connections and registry).
        config: the `redis` section.
        tell: runs the application's `on_departed` for each (user, rooms).
        peers_up: whether every serving worker of this node reaches Redis.
    """

    def __init__(
        self,
        hub: Hub,
        config: RedisConfig,
        tell: Callable[[Departures], None],
        peers_up: Callable[[], bool],
    ) -> None:
        self.hub = hub
        self.ttl = config.heartbeat_ttl
        self.tell = tell
        self.peers_up = peers_up
        # None until the first heartbeat: only a recovery is worth a log line.
        self.up: bool | None = None
        self.beat = 0.0  # monotonic time of the last heartbeat Redis acknowledged
        self.since = 0.0  # when the state was last found kept again after a failure
        self.gone: dict[str, _Gone] = {}
        self.slots: dict[str, str] = {}  # connection id -> the address whose slot it held
        self.untold: Departures = []
        self.on_left: Callable[[Sequence[pushstate.Left]], None] | None = None
        """Told of Pusher subscriptions a retried removal took (their webhooks)."""
        self._lock = asyncio.Lock()

    @property
    def fresh(self) -> bool:
        """Kept in Redis, with a heartbeat within half the TTL."""
        return bool(self.up) and time.monotonic() - self.beat < self.ttl / 2

    @property
    def age(self) -> float:
        """Seconds since the last heartbeat Redis acknowledged."""
        return time.monotonic() - self.beat

    async def run(self) -> None:
        """Beat every third of the TTL, for ever."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.refresh()

    def removal_failed(self, cid: str, user: str, rooms: tuple[str, ...], *, told: bool) -> None:
        """Redis failed while removing `cid`'s state: retry with every beat."""
        self.gone[cid] = _Gone(user, rooms, untold=not told)

    def release_failed(self, ip: str, cid: str) -> None:
        """Redis failed while giving back `cid`'s slot of the address `ip`: retry with
        every beat."""
        self.slots[cid] = ip

    def left_untold(self, user: str, rooms: list[str]) -> None:
        """`on_close` could not tell the rooms of a connection that closed."""
        self.untold.append((user, rooms))
        self._announce()

    async def refresh(self, *, strict: bool = False) -> None:
        """Refresh the heartbeat; write the state back if Redis lost it; then retry what
        failed earlier.

        Any Redis failure marks the state as not kept (health turns 503) and waits for
        the next beat; with `strict` it is raised instead.
        """
        async with self._lock:
            try:
                await self._keep()
            except ServiceUnavailable as exc:
                if self.up:
                    logger.warning(
                        "redis at %s failed keeping this worker's state (%s); retrying",
                        self.hub.bus.address,
                        exc,
                    )
                self.up = False
                if strict:
                    raise
                return
        if not self.up:
            if self.up is False:
                logger.info("this worker's state is kept in redis again")
            self.since = time.monotonic()
        self.up = True
        self._announce()

    async def _keep(self) -> None:
        hub = self.hub
        registry = hub.registry
        if not await registry.heartbeat(self.ttl):
            snapshots = [conn.snapshot() for conn in hub.local.values()]
            if snapshots:
                logger.warning(
                    "redis lost this worker's state; writing back %d connections",
                    len(snapshots),
                )
            await registry.resync(snapshots)
        self.beat = time.monotonic()
        for cid, gone in list(self.gone.items()):
            departure = await registry.remove_connection(cid)
            del self.gone[cid]
            lefts = departure.pushed if departure is not None else ()
            for left in lefts:
                # Its presence channels hear of it at once: pub/sub needs no waiting.
                notice = pushstate.removed_notice(hub.keys, left)
                if notice is not None:
                    hub.bus.post(*notice)
            if lefts and self.on_left is not None:
                self.on_left(lefts)
            if gone.untold:
                self.untold.append((gone.user, list(gone.rooms)))
        for cid, ip in list(self.slots.items()):
            await registry.release_address(ip, cid)
            del self.slots[cid]
        await hub.repair()

    def _announce(self) -> None:
        """Tell the rooms of connections that closed during an outage, once it is safe.

        After Redis came back empty, every worker of every node writes its connections
        back at its own pace; a room's members are only known again once they all have.
        Waiting one heartbeat period after this worker's own recovery gives them that,
        so that no departure is dropped as if its room were empty. The notices go out by
        pub/sub, which reaches only subscribers connected at that moment: it also waits
        until every worker of this node has its Redis connections back (`peers_up`),
        for at most a heartbeat TTL, so that one worker's jittered reconnection does not
        make its clients miss what another announces.
        """
        if not self.untold or not self.hub.bus.up:
            return
        waited = time.monotonic() - self.since
        if waited < self.ttl / 3 or (waited < self.ttl and not self.peers_up()):
            return
        untold, self.untold = self.untold, []
        logger.info("telling the rooms of %d connections that closed during an outage", len(untold))
        self.tell(untold)
