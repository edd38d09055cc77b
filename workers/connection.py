"""One client connection: what applications see of it, and the hot path that writes to it."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from websockets.protocol import OPEN

from shoal.core import protocol, pusher
from shoal.core.auth import Identity, PermissionDenied
from shoal.core.errors import ProtocolError
from shoal.core.history import Since
from shoal.core.keys import TopicKind
from shoal.core.metrics import BINARY, TEXT, counters
from shoal.core.registry import Members, Snapshot
from shoal.core.schema import CloseCode

if TYPE_CHECKING:
    from shoal.core.app import App
    from shoal.workers.hub import Hub
    from shoal.workers.pusher import Client as PusherClient
    from shoal.workers.ratelimit import Allowance
    from shoal.workers.transport import WebSocket

logger = logging.getLogger(__name__)


class Connection:
    """A client connected to this worker.

    Attributes:
        id: unique across the whole deployment (`<worker id>.<n>`; a Pusher client's is
            its `socket_id`, `<n>.<m>`).
        user_id: the user; several connections may share one.
        address: the client's address: `host:port` of the TCP peer, or the host a
            trusted proxy forwarded (`server.trusted_proxies`).
        connected_at: when it connected, in epoch milliseconds.
        metadata: what `set_metadata()` merged in; visible in presence.
        rooms, channels: names this connection is in.
        hub: the worker's hub, for cluster-wide operations (broadcast, presence, ...).
        request_path: the path and query of the opening handshake (a `token`
            parameter's value reads `***`).
        identity: who the client is, decided at its handshake (`refresh` renews it).
        app: the application its messages go to (the worker's, or the Pusher
            endpoint's).
        pusher: a Pusher client's state (`shoal.workers.pusher.Client`); None for a
            client of shoal's own protocol.
    """

    __slots__ = (
        "address",
        "allowance",
        "app",
        "busy",
        "channels",
        "closing",
        "connected_at",
        "deflate",
        "expiry",
        "hub",
        "id",
        "identity",
        "inbox",
        "metadata",
        "protocol",
        "pusher",
        "request_path",
        "rooms",
        "transport",
        "user_id",
        "ws",
    )

    def __init__(
        self,
        cid: str,
        identity: Identity,
        ws: WebSocket,
        hub: Hub,
        *,
        app: App,
        connected_at: int,
        request_path: str,
        pusher_client: PusherClient | None = None,
    ) -> None:
        self.id = cid
        self.user_id = identity.user_id
        self.identity = identity
        # Closes the connection when its token expires (`Sessions.identified()`).
        self.expiry: asyncio.TimerHandle | None = None
        self.ws = ws
        # The hot path reads these two directly: one attribute each, per write.
        self.protocol = ws.protocol
        self.transport = ws.transport
        self.hub = hub
        self.connected_at = connected_at
        self.address = ws.client or ws.remote_address
        self.request_path = request_path
        self.metadata: dict[str, Any] = {}
        self.rooms: set[str] = set()
        self.channels: set[str] = set()
        # With permessage-deflate each connection compresses with its own context, so
        # shared pre-built frames cannot be used for it.
        self.deflate = ws.compressed
        self.closing = False
        # Messages waiting while a handler of this connection is waiting (in order);
        # made when the first one waits (an empty deque is 760 bytes, and most
        # connections never need one).
        self.inbox: collections.deque[Any] | None = None
        self.busy = False
        # What it may still send (`limits.*`): made with its first message.
        self.allowance: Allowance | None = None
        self.app = app
        self.pusher = pusher_client

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id}>"

    def hold(self, item: Any) -> int:
        """Queue `item` behind the handler that is waiting. Returns how many wait."""
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = collections.deque()
        inbox.append(item)
        return len(inbox)

    # Sending

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one JSON message to this client."""
        payload = protocol.encode(message)
        counters.sent(message.get("type"))
        self.push(protocol.frame(payload), payload, True)

    async def send_text(self, text: str) -> None:
        counters.messages_out[TEXT] += 1
        payload = text.encode()
        self.push(protocol.frame(payload), payload, True)

    async def send_bytes(self, data: bytes) -> None:
        counters.messages_out[BINARY] += 1
        self.push(protocol.frame(data, text=False), data, False)

    def push(self, wire: bytes, payload: bytes, text: bool) -> None:
        """Write one pre-built frame, or close the client if it cannot keep up.

        `wire` is `payload` framed once for every recipient; only connections with
        compression frame it again. There is no backpressure here: a client whose unsent
        data exceeds `server.buffer_output_size` is closed as a slow consumer instead.
        """
        if not self.deflate:
            counters.bytes_out += len(wire)  # the transport counts what it compresses
            self.write(wire)
            return
        if self.protocol.state is not OPEN:
            return  # a compressed frame goes through the protocol, which is closing
        self.ws.send(payload, text=text)
        if self.ws.buffered() > self.hub.buffer_limit:
            self.cut_off()

    def write(self, wire: bytes) -> None:
        """Write whole pre-built frames (one or several), for a client without compression.

        Nothing is written once the closing handshake has begun, except replies to what
        arrived before the close in the same read: they still precede the close frame.
        """
        ws = self.ws
        if self.protocol.state is not OPEN and not ws.replying:
            return
        pending = ws.pending
        if pending is not None:  # this client's read is being handled: written after it
            pending.append(wire)
            return
        transport = self.transport
        assert transport is not None  # OPEN: the transport is there
        try:
            transport.write(wire)
        except RuntimeError:
            # The peer reset the connection in this turn of the loop: uvloop closed the
            # transport and calls `connection_lost` next. Nothing is lost by skipping it,
            # and raising would cost the other recipients of a fan-out batch their copy.
            return
        if transport.get_write_buffer_size() > self.hub.buffer_limit:
            self.cut_off()

    def cut_off(self) -> None:
        if not self.closing:
            counters.slow_consumers += 1
            logger.warning(
                "closing %s as a slow consumer: %d bytes unsent", self.id, self.ws.buffered()
            )
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer")

    def close_soon(self, code: int, reason: str, *, translate: bool = True) -> None:
        """Start the closing handshake, once: later calls do nothing.

        The close frame queues behind what is unsent; a client that does not complete the
        handshake within `server.close_timeout` is dropped, which bounds the memory a
        client that stopped reading can hold. A Pusher client gets the Pusher code that
        means what shoal's `code` does (`shoal.core.pusher.close_code`), unless
        `translate` is False (`code` is Pusher's already).
        """
        if not self.closing:
            self.closing = True
            if self.pusher is not None and translate:
                code = pusher.close_code(code)
            self.ws.close(code, reason)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection and wait until it is gone; `on_close` then runs as for
        any close."""
        self.close_soon(code, reason)
        await self.ws.wait_closed()

    # Rooms, channels, metadata

    async def join(
        self, room: str, *, limit: int | None = None, since: Since | None = None
    ) -> Members:
        """Join a room. Returns up to `limit` of its members' distinct user ids (all with
        None; this one's included), and their number (`.total`); with a history, where
        it stands, and with `since`, whether the replay caught the client up."""
        if not self.hub.policy.may_join(self.identity.role, room):
            raise PermissionDenied
        return await self.hub.join(self, TopicKind.ROOM, room, limit, since)

    async def leave(self, room: str, *, limit: int | None = None) -> Members:
        """Leave a room. Returns up to `limit` of the remaining members' distinct user
        ids (all with None), and their number (`.total`)."""
        return await self.hub.leave(self, TopicKind.ROOM, room, limit)

    async def subscribe(self, channel: str) -> None:
        await self.hub.join(self, TopicKind.CHANNEL, channel, limit=0)

    async def unsubscribe(self, channel: str) -> None:
        await self.hub.leave(self, TopicKind.CHANNEL, channel, limit=0)

    async def set_metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `metadata` into this connection's metadata. Returns the result.

        Raises:
            ProtocolError: the result would be over `limits.max_metadata_bytes` as JSON
                (every `presence` that lists this connection carries it); nothing changes.
        """
        merged = {**self.metadata, **metadata}
        limit = self.hub.max_metadata_bytes
        if len(protocol.encode(merged)) > limit:
            raise ProtocolError(f"Metadata too large: at most {limit} bytes as JSON")
        await self.hub.registry.set_metadata(self.id, merged)
        self.metadata = merged
        return merged

    async def dispatch(self, task: str, data: Any = None) -> str:
        """Hand a job to the task pool; its outcome comes back to this connection."""
        return await self.hub.tasks.dispatch(self.id, self.user_id, task, data)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            cid=self.id,
            user=self.user_id,
            addr=self.address,
            at=self.connected_at,
            meta=self.metadata,
            rooms=tuple(self.rooms),
            channels=tuple(self.channels),
            address=None if self.ws.slot is None else self.ws.slot[0],
            pushed=() if self.pusher is None else self.pusher.subscriptions(),
        )
