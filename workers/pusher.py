"""The Pusher endpoint's WebSocket side: pusher-js and Laravel Echo clients on
`/app/{key}`, on the same workers, hub and Redis state as shoal's own protocol.

Each client is an ordinary `Connection` whose application is `Pusher.app` (its handlers
speak Pusher's protocol 7, `shoal.core.pusher`) and whose `pusher` attribute holds its
Pusher state (`Client`). Its id is its `socket_id` (`<n>.<m>`, unique across the
deployment), so the HTTP API's `socket_id` exclusion is the hub's own: a message's
`target` on a channel is the connection left out, on whichever worker or node it is.

Channel subscriptions live in Redis (`shoal.core.pushstate`); events reach every worker
with subscribers over the bus, framed once per worker like room messages. Presence
members are added and removed cluster-wide, on a user's first and last connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from shoal.config.model import PusherAppConfig, PusherConfig
from shoal.core import envelope, protocol, pusher, webhooks
from shoal.core.app import App, FrameHandler, OpenHandler
from shoal.core.errors import ServiceUnavailable
from shoal.core.metrics import counters
from shoal.core.pusher import Close, Kind, PusherError
from shoal.core.pushstate import Channels, Left

if TYPE_CHECKING:
    from shoal.core.keys import Keys
    from shoal.workers.connection import Connection
    from shoal.workers.hub import Hub

logger = logging.getLogger(__name__)

PATH_PREFIX = "/app/"
USER_PREFIX = "#pusher:"
"""Every connection of app `N` is registered as the user `#pusher:N` (a `#` no shoal user
id can hold): a signed-in Pusher user is a presence member or a `#server-to-user-` channel
subscriber, not a shoal user."""


def user_of(client: Client) -> str:
    """The user a Pusher client's connection is registered as (`USER_PREFIX` + app id)."""
    return USER_PREFIX + (client.app.id if client.app is not None else "-")


@dataclass(slots=True)
class Client:
    """A Pusher client's state on its connection.

    Attributes:
        app: its app; None when the key was unknown (it is told, then closed).
        channels: channel -> (presence member user id, its user_info); ("", None) on
            other channels.
        user: the user it signed in as (`pusher:signin`), if any.
        origin: the `Origin` of its handshake, if any.
    """

    app: PusherAppConfig | None
    origin: str | None = None
    channels: dict[str, tuple[str, Any]] = field(default_factory=dict)
    user: str | None = None
    sent: int = 0
    """Client events sent in the current second (`window`)."""
    window: float = 0.0

    def bus_channels(self, keys: Keys) -> list[bytes]:
        """The bus channels of its subscriptions."""
        if self.app is None:
            return []
        return [keys.bus_pusher(self.app.id, name) for name in self.channels]

    def subscriptions(self) -> list[tuple[str, str, str, Any]]:
        """(app, channel, member, user_info) of each subscription (`Snapshot.pushed`)."""
        if self.app is None:
            return []
        app = self.app.id
        return [(app, name, member, info) for name, (member, info) in self.channels.items()]


class Pusher:
    """The Pusher endpoint of one worker.

    Args:
        config: the `pusher` section.
        hub: the worker's hub.
        max_channels: `limits.max_channels`, per connection.
        max_pending: `tasks.max_pending`, which bounds the webhooks queued.
    """

    def __init__(
        self, config: PusherConfig, hub: Hub, *, max_channels: int = 100, max_pending: int = 10_000
    ) -> None:
        self.by_key = {app.key: app for app in config.apps}
        self.by_id = {app.id: app for app in config.apps}
        self.max_pending = max_pending
        self.hub = hub
        self.state = Channels(hub.registry.redis, hub.keys)
        self.max_channels = max_channels
        app = self.app = App()
        # The worker gives these handlers its own `Connection`, the App API's protocol
        # and more (`push`, `pusher`), which they need.
        app.open_handler = cast(OpenHandler, self._open)
        app.close_handler = cast(OpenHandler, self._close)
        app.frame_handler = cast(FrameHandler, self._frame)

    def client(self, path: str, origin: str | None) -> Client:
        """The state of a new client from its handshake's path (`/app/{key}?...`)."""
        key = path.partition("?")[0][len(PATH_PREFIX) :]
        return Client(self.by_key.get(key), origin)

    # The connection's life

    async def _open(self, conn: Connection) -> None:
        client = _client(conn)
        app = client.app
        if app is None:
            self._refuse(conn, "Application does not exist", Close.APP_NOT_FOUND)
            return
        if not app.enabled:
            self._refuse(conn, "Application is disabled", Close.APP_DISABLED)
            return
        if app.allowed_origins is not None and client.origin not in app.allowed_origins:
            self._refuse(conn, "Origin not allowed", Close.UNAUTHORIZED)
            return
        if app.max_connections is not None:
            count = await self.hub.registry.redis.execute(
                "HGET", self.hub.keys.users, USER_PREFIX + app.id
            )
            if int(count or 0) > app.max_connections:
                self._refuse(conn, "Over connection quota", Close.OVER_QUOTA)
                return
        _send(conn, pusher.connection_established(conn.id, app.activity_timeout))

    @staticmethod
    def _refuse(conn: Connection, message: str, code: int) -> None:
        _send(conn, pusher.error_frame(message, code))
        conn.close_soon(code, message, translate=False)

    async def _close(self, conn: Connection) -> None:
        client = _client(conn)
        for name in list(client.channels):
            await self._unsubscribe(conn, name)

    async def _frame(self, conn: Connection, data: str | bytes) -> None:
        client = _client(conn)
        if client.app is None or conn.closing:
            return
        try:
            if type(data) is bytes:
                raise PusherError("Binary frames are not supported")
            frame = pusher.parse(data)
            event = frame.event
            if event == "pusher:ping":
                _send(conn, pusher.PONG)
            elif event == "pusher:subscribe":
                await self._subscribe(conn, frame.data)
            elif event == "pusher:unsubscribe":
                name = frame.data.get("channel") if type(frame.data) is dict else None
                if name in client.channels:
                    await self._unsubscribe(conn, name)
            elif event == "pusher:signin":
                await self._signin(conn, frame.data)
            elif event.startswith("client-"):
                await self._client_event(conn, frame)
            # Anything else (pusher:pong, unknown events) needs no answer.
        except PusherError as exc:
            counters.protocol_errors["message"] += 1
            _send(conn, pusher.error_frame(str(exc), exc.code))
            if exc.code == Close.UNAUTHORIZED:
                conn.close_soon(exc.code, str(exc), translate=False)
        except ServiceUnavailable:
            _send(conn, pusher.error_frame("Service unavailable, try again", Close.OVER_CAPACITY))

    # Subscriptions

    async def _subscribe(self, conn: Connection, data: Any) -> None:
        client = _client(conn)
        app = client.app
        assert app is not None
        name, auth, channel_data = pusher.subscription(data)
        channel = pusher.channel(name)
        if name in client.channels:
            await self._succeeded(conn, channel, fresh=False)
            return
        if channel.kind is Kind.USER:
            # Only through `pusher:signin`, which subscribed it already.
            _send(conn, pusher.subscription_error(name, "Sign in as this user first", 403))
            return
        if len(client.channels) >= self.max_channels:
            raise PusherError(f"Too many channels: at most {self.max_channels} per connection")
        member, info = "", None
        if channel.authorized:
            signed = channel_data if channel.kind is Kind.PRESENCE else None
            expected = pusher.channel_auth(app.key, app.secret_value(), conn.id, name, signed)
            if not pusher.check_auth(auth, expected):
                _send(conn, pusher.subscription_error(name, "Invalid signature", 401))
                return
        if channel.kind is Kind.PRESENCE:
            assert channel_data is not None  # signed over it: the check failed otherwise
            if len(channel_data) > app.max_presence_member_bytes:
                limit = app.max_presence_member_bytes
                _send(conn, pusher.subscription_error(name, f"Member data over {limit} bytes", 413))
                return
            parsed = pusher.member(channel_data)
            member, info = parsed.user_id, parsed.user_info
        change = await self._join(conn, name, member, info)
        if member and change.connections == 1 and change.members > app.max_presence_members:
            await self._unsubscribe(conn, name, announce=False)
            limit = app.max_presence_members
            _send(conn, pusher.subscription_error(name, f"Over {limit} members", 403))
            return
        await self._succeeded(conn, channel, fresh=True)
        await self._hook(app, webhooks.transitions(name, member, change, joined=True))
        if member and change.connections == 1:
            added = {"user_id": member, "user_info": info}
            self._publish(app.id, name, pusher.frame("pusher_internal:member_added", added, name),
                          exclude=conn.id)  # fmt: skip

    async def _join(self, conn: Connection, name: str, member: str, info: Any) -> Any:
        """Subscribe on the bus (confirmed first: nothing published after the reply is
        missed), then record the subscription."""
        client = _client(conn)
        assert client.app is not None
        hub = self.hub
        bus_channel = hub.keys.bus_pusher(client.app.id, name)
        await hub.bus.subscribe(bus_channel)
        try:
            change = await self.state.subscribe(client.app.id, name, conn.id, member, info)
        except BaseException:
            hub.bus.unsubscribe(bus_channel)
            raise
        client.channels[name] = (member, info)
        hub.topics.setdefault(bus_channel, set()).add(conn)
        return change

    async def _succeeded(self, conn: Connection, channel: pusher.Channel, *, fresh: bool) -> None:
        client = _client(conn)
        assert client.app is not None
        name = channel.name
        if channel.kind is Kind.PRESENCE:
            members = await self.state.members(client.app.id, name)
            presence = {"ids": list(members), "hash": members, "count": len(members)}
            data: dict[str, Any] = {"presence": presence}
        else:
            data = {}
        _send(conn, pusher.frame("pusher_internal:subscription_succeeded", data, name))
        if channel.cache and fresh:
            cached = await self.state.cached(client.app.id, name)
            if cached is not None:
                _send(conn, cached)
            else:
                _send(conn, protocol.encode({"event": "pusher:cache_miss", "channel": name}))
                await self._hook(client.app, [{"name": "cache_miss", "channel": name}])

    async def _unsubscribe(self, conn: Connection, name: str, *, announce: bool = True) -> None:
        client = _client(conn)
        app = client.app
        assert app is not None
        member, _ = client.channels.pop(name)
        self.hub.detach(conn, self.hub.keys.bus_pusher(app.id, name))
        # If Redis fails here, the subscription goes with the connection's state, and a
        # member who left is announced then (`Keeper`, `pushstate.removed_notice`).
        change = await self.state.unsubscribe(app.id, name, conn.id, member)
        if announce:
            await self._hook(app, webhooks.transitions(name, member, change, joined=False))
        if announce and member and change.connections == 0:
            removed = {"user_id": member}
            self._publish(app.id, name, pusher.frame("pusher_internal:member_removed", removed,
                                                     name), exclude=None)  # fmt: skip

    # User authentication

    async def _signin(self, conn: Connection, data: Any) -> None:
        client = _client(conn)
        app = client.app
        assert app is not None
        user_data, auth = pusher.signin(data)
        expected = pusher.user_auth(app.key, app.secret_value(), conn.id, user_data)
        if not pusher.check_auth(auth, expected):
            raise PusherError("Invalid signature", Close.UNAUTHORIZED)
        user = pusher.signed_in_user(user_data)
        if client.user is not None and client.user != user:
            raise PusherError("Already signed in as another user", Close.UNAUTHORIZED)
        if client.user is None:
            client.user = user
            await self._join(conn, pusher.user_channel(user), "", None)
        _send(conn, pusher.frame("pusher:signin_success", {"user_data": user_data}))

    # Client events

    async def _client_event(self, conn: Connection, frame: pusher.ClientFrame) -> None:
        client = _client(conn)
        app = client.app
        assert app is not None
        name = frame.channel
        if app.client_events == "off":
            raise PusherError(
                "Client events are disabled for this app", Close.CLIENT_EVENT_REJECTED
            )
        if name is None or name not in client.channels:
            raise PusherError(
                "Client events need a subscribed channel", Close.CLIENT_EVENT_REJECTED
            )
        channel = pusher.channel(name)
        if not channel.takes_client_events:
            raise PusherError(
                "Client events go on private and presence channels only",
                Close.CLIENT_EVENT_REJECTED,
            )
        if len(frame.event) > pusher.MAX_EVENT_NAME_LENGTH:
            raise PusherError("Event name too long", Close.CLIENT_EVENT_REJECTED)
        now = time.monotonic()
        if now - client.window >= 1.0:
            client.window, client.sent = now, 0
        client.sent += 1
        if client.sent > app.client_events_per_second:
            raise PusherError(
                f"Client event rejected: over {app.client_events_per_second} per second",
                Close.CLIENT_EVENT_REJECTED,
            )
        member = client.channels[name][0] or None
        payload = pusher.client_event(frame.event, name, frame.data, member)
        if len(payload) > app.max_event_bytes:
            raise PusherError(
                f"Client event over {app.max_event_bytes} bytes", Close.CLIENT_EVENT_REJECTED
            )
        self._publish(app.id, name, payload, exclude=conn.id)
        await self.hub.relieved()  # as a room message's sender waits: backpressure
        if channel.cache:
            await self.hub.registry.redis.execute(*self.state.cache_command(app.id, name, payload))
        if app.webhooks:  # else no event to build: this is every client event's path
            event: dict[str, Any] = {"name": "client_event", "channel": name,
                                     "event": frame.event, "data": frame.data,
                                     "socket_id": conn.id}  # fmt: skip
            if member is not None:
                event["user_id"] = member
            await self._hook(app, [event])

    # Webhooks

    async def _hook(self, app: PusherAppConfig, events: list[dict[str, Any]]) -> None:
        """Queue `events` for `app`'s webhooks, if it has any that want them."""
        if app.webhooks and events:
            keys = self.hub.keys
            commands = webhooks.dispatches(keys, app, events, time.time(), self.max_pending)
            if commands:
                await self.hub.registry.redis.pipeline(commands)

    def left(self, lefts: Iterable[Left]) -> None:
        """Subscriptions of this worker's connections removed after Redis failed while
        they closed: their webhooks (the keeper announced the members who left)."""
        for departed in lefts:
            app = self.by_id.get(departed.app)
            if app is not None and app.webhooks:
                self.hub.spawn(self._hook(app, webhooks.left(departed)))

    def _publish(self, app: str, name: str, payload: bytes, *, exclude: str | None) -> None:
        self.hub.bus.post(self.hub.keys.bus_pusher(app, name), envelope.message(payload, exclude))


def _client(conn: Connection) -> Client:
    client = conn.pusher
    assert client is not None  # the Pusher app's handlers run for Pusher clients only
    return client


def _send(conn: Connection, payload: bytes) -> None:
    conn.push(protocol.frame(payload), payload, True)
