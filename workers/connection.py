"""One client connection: what applications see of it, and the hot path that writes to it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import OPEN

from shoal.core import protocol
from shoal.core.keys import TopicKind
from shoal.core.registry import Snapshot
from shoal.core.schema import CloseCode

if TYPE_CHECKING:
    from shoal.workers.admission import Admission
    from shoal.workers.hub import Hub

logger = logging.getLogger(__name__)


class Socket(ServerConnection):
    """websockets' server connection, noting when the client last sent anything, and
    releasing its admission when the transport is gone.

    Any bytes count, pongs included, so a client that answers pings is never idle.
    """

    last_seen: float
    admission: Admission | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_seen = self.loop.time()

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.loop.time()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        admission, self.admission = self.admission, None
        if admission is not None:
            admission.release()
        super().connection_lost(exc)


async def close_socket(socket: ServerConnection, code: int, reason: str, grace: float) -> None:
    """Close with `code`, and abort the TCP connection if that takes longer than `grace` s.

    websockets' `close()` first drains the write buffer, which never happens for a client
    that stopped reading: the timeout bounds the memory such a client holds.
    """
    try:
        async with asyncio.timeout(grace):
            await socket.close(code, reason)
    except TimeoutError:
        socket.transport.abort()


class Connection:
    """A client connected to this worker.

    Attributes:
        id: unique across the whole deployment (`<worker id>.<n>`).
        user_id: the user; several connections may share one.
        address: the client's address, `host:port`.
        connected_at: when it connected, in epoch milliseconds.
        metadata: what `set_metadata()` merged in; visible in presence.
        rooms, channels: names this connection is in.
        hub: the worker's hub, for cluster-wide operations (broadcast, presence, ...).
        request_path: the path and query of the opening handshake.
    """

    __slots__ = (
        "address",
        "channels",
        "closing",
        "connected_at",
        "deflate",
        "hub",
        "id",
        "metadata",
        "request_path",
        "rooms",
        "socket",
        "transport",
        "user_id",
    )

    def __init__(self, cid: str, user_id: str, socket: Socket, hub: Hub, connected_at: int) -> None:
        self.id = cid
        self.user_id = user_id
        self.socket = socket
        self.transport = socket.transport
        self.hub = hub
        self.connected_at = connected_at
        peer = socket.remote_address
        self.address = f"{peer[0]}:{peer[1]}" if peer else ""
        self.request_path = socket.request.path if socket.request else ""
        self.metadata: dict[str, Any] = {}
        self.rooms: set[str] = set()
        self.channels: set[str] = set()
        # With permessage-deflate each connection compresses with its own context, so
        # shared pre-built frames cannot be used for it.
        self.deflate = bool(socket.protocol.extensions)
        self.closing = False

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id}>"

    # Sending

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one JSON message to this client."""
        payload = protocol.encode(message)
        self.push(protocol.frame(payload), payload, True)

    async def send_text(self, text: str) -> None:
        payload = text.encode()
        self.push(protocol.frame(payload), payload, True)

    async def send_bytes(self, data: bytes) -> None:
        self.push(protocol.frame(data, text=False), data, False)

    def push(self, wire: bytes, payload: bytes, text: bool) -> None:
        """Write one pre-built frame, or close the client if it cannot keep up.

        `wire` is `payload` framed once for every recipient; only connections with
        compression frame it again. There is no backpressure here: a client whose unsent
        data exceeds `server.buffer_output_size` is closed as a slow consumer instead.
        """
        if not self.deflate:
            self.write(wire)
            return
        socket = self.socket
        if socket.protocol.state is not OPEN:
            return
        if text:
            socket.protocol.send_text(payload)
        else:
            socket.protocol.send_binary(payload)
        socket.send_data()
        if self.transport.get_write_buffer_size() > self.hub.buffer_limit:
            self.cut_off()

    def write(self, wire: bytes) -> None:
        """Write whole pre-built frames (one or several), for a client without compression."""
        if self.socket.protocol.state is not OPEN:
            return
        transport = self.transport
        transport.write(wire)
        if transport.get_write_buffer_size() > self.hub.buffer_limit:
            self.cut_off()

    def cut_off(self) -> None:
        if not self.closing:
            logger.warning(
                "closing %s as a slow consumer: %d bytes unsent",
                self.id,
                self.transport.get_write_buffer_size(),
            )
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer")

    def close_soon(self, code: int, reason: str) -> None:
        """Start closing in the background, once: later calls do nothing."""
        if not self.closing:
            self.closing = True  # before the task runs: more deliveries may come first
            self.hub.spawn(self.close(code, reason))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection; the server's close handling then runs as for any close."""
        self.closing = True
        await close_socket(self.socket, code, reason, self.hub.close_timeout)

    # Rooms, channels, metadata

    async def join(self, room: str) -> list[str]:
        """Join a room. Returns the members' user ids (this one included, no duplicates)."""
        return await self.hub.join(self, TopicKind.ROOM, room)

    async def leave(self, room: str) -> list[str]:
        """Leave a room. Returns the remaining members' user ids."""
        return await self.hub.leave(self, TopicKind.ROOM, room)

    async def subscribe(self, channel: str) -> None:
        await self.hub.join(self, TopicKind.CHANNEL, channel)

    async def unsubscribe(self, channel: str) -> None:
        await self.hub.leave(self, TopicKind.CHANNEL, channel)

    async def set_metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `metadata` into this connection's metadata. Returns the result."""
        merged = {**self.metadata, **metadata}
        await self.hub.registry.set_metadata(self.id, merged)
        self.metadata = merged
        return merged

    def snapshot(self) -> Snapshot:
        return Snapshot(
            cid=self.id,
            user=self.user_id,
            addr=self.address,
            at=self.connected_at,
            meta=self.metadata,
            rooms=tuple(self.rooms),
            channels=tuple(self.channels),
        )
