"""shoal's client library: `Client` (blocking) and `PersistentClient` (asyncio, reconnects).

It needs `websockets` and the wire schema alone (`shoal.core.schema`): the `shoal-client`
distribution installs it without the server (docs/client.md).
"""

from shoal.client.backoff import Backoff
from shoal.client.blocking import Client
from shoal.client.errors import (
    AuthenticationFailed,
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    ErrorReply,
    GaveUp,
    HandshakeRefused,
    ProtocolError,
    QueueFull,
    TaskFailed,
    TimedOut,
)
from shoal.client.persistent import (
    Connected,
    Disconnected,
    PersistentClient,
    Reconnected,
    Reconnecting,
    RecoveryFailed,
    State,
)
from shoal.client.positions import Position

__all__ = [
    "AuthenticationFailed",
    "Backoff",
    "Client",
    "ClientError",
    "ConnectFailed",
    "Connected",
    "ConnectionClosed",
    "Disconnected",
    "ErrorReply",
    "GaveUp",
    "HandshakeRefused",
    "PersistentClient",
    "Position",
    "ProtocolError",
    "QueueFull",
    "Reconnected",
    "Reconnecting",
    "RecoveryFailed",
    "State",
    "TaskFailed",
    "TimedOut",
]
