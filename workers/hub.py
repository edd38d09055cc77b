"""The hub of one worker: its local connections and rooms, and cluster-wide delivery.

Every message for more than one client is encoded once where it is sent (JSON), crosses
Redis once (one PUBLISH to a room's, a worker's or the global channel), and is framed once
in each receiving worker; the same frame bytes are then written to every local recipient.
No Redis traffic and no encoding happen per recipient.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.core import app, envelope, protocol
from shoal.core import history as history_api
from shoal.core.auth import OPEN_POLICY, Policy
from shoal.core.bus import Bus
from shoal.core.errors import EnvelopeError, ProtocolError
from shoal.core.keys import Keys, TopicKind
from shoal.core.metrics import counters
from shoal.core.registry import Members, Registry
from shoal.core.schema import PresenceEntry
from shoal.workers.connection import Connection
from shoal.workers.dispatcher import Tasks

# Called with the users of connections a cleanup removed: [(user_id, [room, ...]), ...].
OnDeparted = Callable[[list[tuple[str, list[str]]]], None]

logger = logging.getLogger(__name__)

_LOG_EVERY = 10.0


class Hub:
    """Local state of one worker and the operations applications call.

    Args:
        keys: key and channel names.
        registry: shared state in Redis.
        bus: pub/sub.
        tasks: the task queue.
        buffer_limit: `server.buffer_output_size`.
        close_timeout: `server.close_timeout`.
    """

    def __init__(
        self,
        keys: Keys,
        registry: Registry,
        bus: Bus,
        tasks: Tasks,
        *,
        buffer_limit: int,
        close_timeout: float,
        max_metadata_bytes: int,
        max_rooms: int = 100,
        max_channels: int = 100,
        policy: Policy = OPEN_POLICY,
        history: history_api.Rules | None = None,
    ) -> None:
        self.keys = keys
        self.history = history or history_api.Rules()
        """Which rooms keep a history (`app.history`)."""
        if self.history:
            bus.load_script(history_api.APPEND)
        self.registry = registry
        self.bus = bus
        self.tasks = tasks
        self.buffer_limit = buffer_limit
        self.close_timeout = close_timeout
        self.max_metadata_bytes = max_metadata_bytes
        self.policy = policy
        """What each role may do (`auth.*`)."""
        self.max_topics = {TopicKind.ROOM: max_rooms, TopicKind.CHANNEL: max_channels}
        self.worker_id = registry.worker_id
        self.node_id = registry.node_id
        self.worker_channel = keys.bus_worker(self.worker_id)
        self.local: dict[str, Connection] = {}
        self.topics: dict[bytes, set[Connection]] = {}
        # Connections resuming a room (`join(..., since=...)`): what the room's channel
        # brings meanwhile waits here, (offset count, payload), until the replay is sent.
        self.catching_up: dict[bytes, dict[Connection, list[tuple[int | None, bytes]]]] = {}
        # Background coroutines (`spawn()`): asyncio keeps only weak references to tasks.
        self.background: set[asyncio.Task[None]] = set()
        self.on_departed: OnDeparted | None = None
        # Memberships a failed join or leave may have left half-written in Redis; the
        # worker's heartbeat rewrites them from the local truth (`repair()`).
        self.unsure: set[tuple[TopicKind, str, str, str]] = set()
        self._skipped = 0
        self._skipped_logged = -_LOG_EVERY

    # Lifecycle of local connections

    def register(self, conn: Connection) -> asyncio.Future[list[Any]]:
        """Start recording a new connection in Redis; `adopt()` it once that succeeded.

        Raises:
            ServiceUnavailable: Redis cannot take the commands now; nothing was sent.
        """
        return self.registry.submit_connection(conn.snapshot())

    def adopt(self, conn: Connection) -> None:
        """A registered connection: it receives what is published to it from now on."""
        self.local[conn.id] = conn

    async def remove(self, conn: Connection) -> None:
        """Forget a local connection: leave what it is still in, remove its state."""
        self.local.pop(conn.id, None)
        for channel in self._bus_channels(conn):
            self.detach(conn, channel)
        conn.rooms.clear()
        conn.channels.clear()
        if conn.pusher is not None:
            conn.pusher.channels.clear()
        await self.registry.remove_connection(conn.id)

    def _bus_channels(self, conn: Connection) -> list[bytes]:
        keys = self.keys
        channels = [keys.bus_topic(TopicKind.ROOM, name) for name in conn.rooms] + [
            keys.bus_topic(TopicKind.CHANNEL, name) for name in conn.channels
        ]
        if conn.pusher is not None:
            channels += conn.pusher.bus_channels(keys)
        return channels

    def detach(self, conn: Connection, channel: bytes) -> None:
        """Take `conn` off a channel's local members; drop this worker's interest in it."""
        members = self.topics.get(channel)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.topics[channel]
        self.bus.unsubscribe(channel)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a background task, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # Rooms and channels

    async def join(
        self,
        conn: Connection,
        kind: TopicKind,
        name: str,
        limit: int | None = None,
        since: history_api.Since | None = None,
    ) -> Members:
        """Add `conn` to a room or channel. Returns up to `limit` of the members' distinct
        user ids (all with None), and their number (`.total`); for a room with a
        history, its position (`.position`), and with `since`, whether the client was
        caught up (`.recovered`, `.reason`).

        The bus subscription is confirmed before the membership is written and before
        this returns, so the caller's reply is the point after which no message for
        the room can be missed. With `since` (a room with a history), the messages after
        it are sent first, then those that arrived meanwhile, each once and in order.

        Raises:
            ServiceUnavailable: Redis failed; `conn` is not in the room (whatever Redis
                holds half-written is repaired later).
        """
        names = conn.rooms if kind is TopicKind.ROOM else conn.channels
        rule = self.history.of(name) if kind is TopicKind.ROOM else None
        if name in names:
            members = await self.registry.members(kind, name, limit)
            if rule is not None:
                members.position = await self._position(name, rule)
            return members
        most = self.max_topics[kind]
        if len(names) >= most:
            what = "rooms" if kind is TopicKind.ROOM else "channels"
            raise ProtocolError(f"Too many {what}: at most {most} per connection")
        channel = self.keys.bus_topic(kind, name)
        await self.bus.subscribe(channel)
        if rule is not None:
            # Held from the subscription on, for a new join as for a resume: what is
            # routed before `conn` is among the room's members would otherwise be lost,
            # after the offset the reply gives.
            self.catching_up.setdefault(channel, {})[conn] = []
        try:
            members = await self.registry.join(kind, name, conn.id, conn.user_id, limit)
            if rule is not None:
                members.position = await self._position(name, rule)
                if since is not None:
                    await self._catch_up(conn, channel, name, since, members)
                else:
                    self._release(conn, channel, history_api.number(members.position.offset))
        except BaseException:
            self._stop_catching_up(conn, channel)
            self.bus.unsubscribe(channel)
            self.unsure.add((kind, name, conn.id, conn.user_id))
            raise
        names.add(name)
        self.topics.setdefault(channel, set()).add(conn)
        return members

    async def _position(self, room: str, rule: history_api.Rule) -> history_api.Position:
        asked = history_api.position(self.keys, room, rule, epoch=self.history.epoch())
        reply = await self.registry.redis.execute(*asked)
        return history_api.parse_position(reply)

    async def _catch_up(
        self,
        conn: Connection,
        channel: bytes,
        room: str,
        since: history_api.Since,
        members: Members,
    ) -> None:
        """Send `conn` what `room` said after `since`, then what arrived meanwhile, once
        each and in order; say in `members` whether that caught it up."""
        position = members.position
        assert position is not None
        entries: list[Any] = []
        if since.epoch == position.epoch:
            after = since.offset
            entries = await self.registry.redis.execute(*history_api.replay(self.keys, room, after))
        replayed = history_api.payloads(entries, position.epoch)
        members.reason = history_api.recovered(
            since, position, replayed[0][0] if replayed else None
        )
        members.recovered = members.reason is None
        last = history_api.number(since.offset)
        if not members.recovered:
            # The client refetches up to the room's position from its own records: it
            # gets what comes after it, as on a new join.
            replayed = []
            last = history_api.number(position.offset)
        waiting = self._stop_catching_up(conn, channel)
        for offset, payload in replayed:
            conn.push(protocol.frame(payload), payload, True)
            last = history_api.number(offset)
        for count, payload in waiting:
            if count is None or count > last:  # not replayed already
                conn.push(protocol.frame(payload), payload, True)
        counters.deliveries += len(replayed) + len(waiting)

    def _release(self, conn: Connection, channel: bytes, after: int) -> None:
        """Send `conn`, joining anew, what its room's channel brought while it joined
        after `after`, the offset its reply gives."""
        released = 0
        for count, payload in self._stop_catching_up(conn, channel):
            if count is None or count > after:
                conn.push(protocol.frame(payload), payload, True)
                released += 1
        counters.deliveries += released

    def _stop_catching_up(self, conn: Connection, channel: bytes) -> list[tuple[int | None, bytes]]:
        waiting = self.catching_up.get(channel)
        if waiting is None:
            return []
        held = waiting.pop(conn, [])
        if not waiting:
            del self.catching_up[channel]
        return held

    async def leave(
        self, conn: Connection, kind: TopicKind, name: str, limit: int | None = None
    ) -> Members:
        """Remove `conn` from a room or channel. Returns up to `limit` of the remaining
        members' distinct user ids (all with None), and their number (`.total`).

        Raises:
            ProtocolError: "Not in room" / "Not subscribed".
            ServiceUnavailable: Redis failed; `conn` has left locally, and Redis is
                repaired later.
        """
        names = conn.rooms if kind is TopicKind.ROOM else conn.channels
        if name not in names:
            raise ProtocolError("Not in room" if kind is TopicKind.ROOM else "Not subscribed")
        names.discard(name)
        self.detach(conn, self.keys.bus_topic(kind, name))
        try:
            return await self.registry.leave(kind, name, conn.id, conn.user_id, limit)
        except BaseException:
            self.unsure.add((kind, name, conn.id, conn.user_id))
            raise

    async def repair(self) -> None:
        """Make Redis agree with local truth on the memberships a failed join or leave
        left unsure.

        Raises:
            ServiceUnavailable: Redis failed again; what is left stays for next time.
        """
        for item in list(self.unsure):
            kind, name, cid, user = item
            conn = self.local.get(cid)
            names = () if conn is None else conn.rooms if kind is TopicKind.ROOM else conn.channels
            # Gone or left: the room's hash may hold it although the connection's own hash
            # (which removal reads) does not list the room.
            await self.registry.reconcile(kind, name, cid, user, member=name in names)
            self.unsure.discard(item)

    # Cluster-wide delivery

    async def publish(
        self,
        room: str,
        message: Mapping[str, Any],
        *,
        exclude: app.Connection | None = None,
        kind: TopicKind = TopicKind.ROOM,
    ) -> None:
        """Send `message` to every member of a room (or channel), on every worker and node.
        A room with a history keeps it too, with its offset (`shoal.core.history`)."""
        channel = self.keys.bus_topic(kind, room)
        rule = self.history.of(room) if kind is TopicKind.ROOM and self.history else None
        if rule is None:
            await self._publish(channel, protocol.encode(message), exclude)
            return
        head = protocol.encode(message)[:-1]  # `,"offset":...}` is added by the script
        if head == b"{":
            raise ProtocolError("An empty message cannot be kept in a room's history")
        epoch, exclude_id = self.history.epoch(), exclude.id if exclude else ""
        appended = history_api.append(
            self.keys, room, rule, channel, head, epoch=epoch, exclude=exclude_id
        )
        self.bus.post_command(*appended)
        await self.relieved()

    async def broadcast(
        self, message: Mapping[str, Any], *, exclude: app.Connection | None = None
    ) -> None:
        """Send `message` to every connection of the deployment, but `exclude`."""
        await self._publish(self.keys.bus_all, protocol.encode(message), exclude)

    async def send_to_user(self, user_id: str, message: Mapping[str, Any]) -> int:
        """Send `message` to every connection of `user_id`. Returns how many it has (0: none).

        Connections on this worker get it directly; each other worker holding some gets
        one PUBLISH on its own channel.
        """
        connections = await self.registry.user_connections(user_id)
        if not connections:
            return 0
        payload = protocol.encode(message)
        by_worker = _by_worker(connections)
        mine = by_worker.pop(self.worker_id, ())
        if mine:
            wire = protocol.frame(payload)
            for cid in mine:
                conn = self.local.get(cid)
                if conn is not None:
                    conn.push(wire, payload, True)
                    counters.deliveries += 1
        for wid, cids in by_worker.items():
            self.bus.post(self.keys.bus_worker(wid), envelope.message(payload, cids))
        return len(connections)

    async def disconnect_user(
        self, user_id: str, message: Mapping[str, Any], code: int, reason: str
    ) -> int:
        """Send `message` to every connection of `user_id`, on any worker or node, then
        close each with `code` and `reason`. Returns how many it had (0: none)."""
        connections = await self.registry.user_connections(user_id)
        payload = protocol.encode(message)
        by_worker = _by_worker(connections)
        mine = by_worker.pop(self.worker_id, None)
        if mine:
            self._disconnect(mine, payload, code, reason)
        for wid, cids in by_worker.items():
            data = envelope.disconnect(payload, code, reason, cids)
            self.bus.post(self.keys.bus_worker(wid), data)
        return len(connections)

    def _disconnect(self, cids: list[str], payload: bytes, code: int, reason: str) -> None:
        wire = protocol.frame(payload)
        for cid in cids:
            conn = self.local.get(cid)
            if conn is not None and not conn.closing:
                conn.push(wire, payload, True)
                counters.deliveries += 1
                conn.close_soon(code, reason)

    async def ban(self, user_id: str, seconds: int, record: dict[str, Any]) -> None:
        """Refuse `user_id`'s handshakes with 403 for `seconds`, across the deployment."""
        await self.registry.ban(user_id, seconds, record)

    async def unban(self, user_id: str) -> bool:
        """Lift `user_id`'s ban. Returns whether there was one."""
        return await self.registry.unban(user_id)

    async def _publish(
        self, channel: bytes, payload: bytes, exclude: app.Connection | None
    ) -> None:
        self.bus.post(channel, envelope.message(payload, exclude.id if exclude else None))
        await self.relieved()

    async def relieved(self) -> None:
        """Return once Redis keeps up with what this worker publishes (at once if it
        does): every publisher waits here after posting."""
        bus = self.bus
        if bus.congested:
            # Backpressure: the message is on its way, but the handler that published it
            # waits until Redis catches up, and the client's further messages wait
            # unread meanwhile (`Sessions`), so that no client can publish faster than
            # the slowest worker of the deployment reads.
            counters.publish_waits += 1
            await bus.relieved()

    def deliver(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Deliver bus messages, all those of one read from Redis, to local recipients.

        Each message is framed once. A client's frames from the whole batch are joined
        and written at once, in order: under load this turns one send() per message and
        client into one per batch and client, which is what bounds fan-out.
        """
        routed = route(messages, self.local, self.topics, self.worker_channel, self.keys.bus_all)
        if self.catching_up:
            self._hold(messages)
        # Counted per batch: the recipients' frames are written below.
        counters.deliveries += routed.deliveries
        counters.bytes_out += routed.written
        for conn, wire, payload, text in routed.deflated:
            conn.push(wire, payload, text)
        for conn, frames in routed.outbox.items():
            conn.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if routed.departed and self.on_departed is not None:
            self.on_departed(routed.departed)
        if routed.tasks:
            self.tasks.done(routed.tasks)
        for gone in routed.disconnects:
            self._disconnect(gone.target, gone.payload, gone.code, gone.reason)
        if routed.rejected:
            self._skipped += routed.rejected
            now = asyncio.get_running_loop().time()
            if now - self._skipped_logged >= _LOG_EVERY:
                logger.warning(
                    "skipped %d bus messages this worker cannot decode (%s)",
                    self._skipped,
                    routed.rejected_example,
                )
                self._skipped, self._skipped_logged = 0, now

    def _hold(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Keep what the channels of resuming connections bring, for `_catch_up`."""
        for channel, data in messages:
            waiting = self.catching_up.get(channel)
            if waiting is None:
                continue
            try:
                item = envelope.unpack(data)
            except EnvelopeError:
                continue  # `route` counted it
            if type(item) is not envelope.Message:
                continue
            count = history_api.offset_of(item.payload)
            for conn, held in waiting.items():
                if item.target != conn.id:
                    held.append((count, item.payload))

    # Queries

    async def room_members(self, room: str, limit: int | None = None) -> Members:
        """Up to `limit` of the distinct user ids in a room (all with None), across
        workers and nodes, and their number (`.total`)."""
        return await self.registry.members(TopicKind.ROOM, room, limit)

    async def presence(self, room: str | None = None) -> list[PresenceEntry]:
        """Who is connected, across workers and nodes: the whole server, or one room."""
        return await self.registry.presence(room)

    async def total_users(self) -> int:
        """How many distinct users are connected, across workers and nodes."""
        return await self.registry.total_users()

    async def user_connections(self, user_id: str) -> int:
        """How many connections `user_id` has open, across workers and nodes."""
        return len(await self.registry.user_connections(user_id))


def _by_worker(connections: Mapping[str, str]) -> dict[str, list[str]]:
    """A user's connections (connection id -> worker id) grouped by worker."""
    grouped: dict[str, list[str]] = {}
    for cid, wid in connections.items():
        grouped.setdefault(wid, []).append(cid)
    return grouped


@dataclass(slots=True)
class Routed:
    """Where one batch of bus messages goes: see `route()`."""

    outbox: dict[Connection, list[bytes]] = field(default_factory=dict)
    """Pre-built frames per connection without compression, in arrival order."""
    deflated: list[tuple[Connection, bytes, bytes, bool]] = field(default_factory=list)
    """(connection, frame, payload, text) for connections that compress: each frames its own."""
    departed: list[tuple[str, list[str]]] = field(default_factory=list)
    """Users whose connections went without on_close, with their rooms."""
    tasks: list[envelope.TaskDone] = field(default_factory=list)
    """Outcomes of tasks, on this worker's channel."""
    disconnects: list[envelope.Disconnect] = field(default_factory=list)
    """Kicks and bans of local connections, on this worker's channel."""
    rejected: int = 0
    rejected_example: str = ""
    deliveries: int = 0
    """Copies of messages routed to recipients, compressed or not."""
    written: int = 0
    """Bytes of the frames in `outbox` (those in `deflated` are counted as compressed)."""


def route(
    messages: list[tuple[bytes, bytes]],
    local: Mapping[str, Connection],
    topics: Mapping[bytes, set[Connection]],
    worker_channel: bytes,
    bus_all: bytes,
) -> Routed:
    """Decide, with no I/O, which local connections receive each message of a batch.

    A worker's own channel names its recipients; the global channel reaches every local
    connection; a room's or channel's reaches its local members. A message's `target`
    on those is a connection to leave out (its sender).
    """
    routed = Routed()
    outbox = routed.outbox
    for channel, data in messages:
        try:
            item = envelope.unpack(data)
        except EnvelopeError as exc:
            routed.rejected += 1
            routed.rejected_example = str(exc)
            continue
        if type(item) is not envelope.Message:
            if isinstance(item, envelope.Departed):
                routed.departed += item.users
            elif isinstance(item, envelope.TaskDone) and channel == worker_channel:
                routed.tasks.append(item)
            elif isinstance(item, envelope.Disconnect) and channel == worker_channel:
                routed.disconnects.append(item)
            continue
        text, payload, target = item
        wire = protocol.frame(payload, text=text)
        excluded = None
        if channel == worker_channel:
            recipients: Collection[Connection] = [local[c] for c in target or () if c in local]
        else:
            found = local.values() if channel == bus_all else topics.get(channel)
            if not found:
                continue
            recipients = found
            if target is not None:
                excluded = local.get(target)  # type: ignore[arg-type]
        # Counted from sizes, not per recipient: this loop is the cost of fan-out.
        before, skipped = len(routed.deflated), 0
        for conn in recipients:
            if conn is excluded:
                skipped = 1
                continue
            if conn.deflate:
                routed.deflated.append((conn, wire, payload, text))
                continue
            if (frames := outbox.get(conn)) is None:
                outbox[conn] = [wire]
            else:
                frames.append(wire)
        plain = len(recipients) - skipped - (len(routed.deflated) - before)
        routed.deliveries += plain
        routed.written += plain * len(wire)
    routed.deliveries += len(routed.deflated)
    return routed
