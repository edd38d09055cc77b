"""The Pusher endpoint's HTTP API, on the WebSocket port: what Pusher's server libraries
(pusher-http-php for Laravel's `pusher` broadcaster, pusher-http-python, ...) call.

Every request is signed as Pusher signs it (`shoal.core.pusher.check_request`); events
go out over the bus like every message shoal fans out, and the channel queries read the
state `shoal.core.pushstate` keeps. Statuses are Pusher's: 400 for a malformed request,
401 for a bad signature or a stale timestamp, 403 for a disabled app, 404 for an unknown
app or path, 405 for a wrong method, 413 for an event over `max_event_bytes`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from shoal.config.model import PusherAppConfig, PusherConfig
from shoal.core import envelope, pusher
from shoal.core.errors import ServiceUnavailable
from shoal.core.pusher import ApiError, Close, Kind
from shoal.core.pushstate import Channels
from shoal.workers.exchange import HttpRequest, HttpResponse
from shoal.workers.hub import Hub

logger = logging.getLogger(__name__)

MAX_CHANNELS_PER_EVENT = 100
MAX_BATCH = 10
_JSON = [("content-type", "application/json")]


def handles(path: str) -> bool:
    """Whether a request's path (its query left out) is the HTTP API's."""
    return path.startswith("/apps/") or (
        path.startswith("/users/") and path.endswith("/terminate_connections")
    )


def answer(status: int, body: Any) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(body), list(_JSON))


class Api:
    """The HTTP API of one worker's Pusher endpoint (a `Responder`).

    Args:
        config: the `pusher` section.
        hub: the worker's hub: its bus publishes, its Redis answers queries.
        clock: epoch seconds, for the signatures' timestamps.
    """

    def __init__(
        self, config: PusherConfig, hub: Hub, clock: Callable[[], float] = time.time
    ) -> None:
        self.by_id = {app.id: app for app in config.apps}
        self.by_key = {app.key: app for app in config.apps}
        self.hub = hub
        self.state = Channels(hub.registry.redis, hub.keys)
        self.clock = clock

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self._handle(request)
        except ApiError as exc:
            return answer(exc.status, {"error": exc.message})
        except ServiceUnavailable:
            return answer(503, {"error": "Service unavailable, try again"})

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        url = urlsplit(request.target)
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if parts[0] == "users":  # pusher-http-python 3.3.4 leaves out /apps/{id}
            app = self.by_key.get(params.get("auth_key", ""))
            if app is None:
                raise ApiError(401, "Unknown auth_key")
            parts = ["apps", app.id, *parts]
        if len(parts) < 3 or parts[0] != "apps":
            raise ApiError(404, "Not found")
        app = self._app(parts[1], request, url.path, params)
        route = parts[2:]
        method = request.method
        if route == ["events"]:
            _method(method, "POST")
            return await self._events(app, _body(request), params)
        if route == ["batch_events"]:
            _method(method, "POST")
            return await self._batch(app, _body(request))
        if route == ["channels"]:
            _method(method, "GET")
            return await self._channels(app, params)
        if len(route) == 2 and route[0] == "channels":
            _method(method, "GET")
            return await self._channel(app, route[1], params)
        if len(route) == 3 and route[0] == "channels" and route[2] == "users":
            _method(method, "GET")
            return await self._users(app, route[1])
        if len(route) == 3 and route[0] == "users" and route[2] == "terminate_connections":
            _method(method, "POST")
            return await self._terminate(app, route[1])
        raise ApiError(404, "Not found")

    def _app(
        self, app_id: str, request: HttpRequest, path: str, params: dict[str, str]
    ) -> PusherAppConfig:
        app = self.by_id.get(app_id)
        if app is None:
            raise ApiError(404, f"Unknown app {app_id}")
        if params.get("auth_key") != app.key:
            raise ApiError(401, "Unknown auth_key")
        pusher.check_request(
            app.secret_value(), request.method, path, params, request.body, now=self.clock()
        )
        if not app.enabled:
            raise ApiError(403, "Application is disabled")
        return app

    # Events

    async def _events(
        self, app: PusherAppConfig, body: dict[str, Any], params: dict[str, str]
    ) -> HttpResponse:
        channels = body.get("channels")
        if channels is None and "channel" in body:
            channels = [body["channel"]]
        event = _event(app, body, channels)
        info = _info(body.get("info"))
        await self._trigger(app, event)
        if not info:
            return answer(200, {})
        return answer(200, {"channels": await self._infos(app, event.channels, info)})

    async def _batch(self, app: PusherAppConfig, body: dict[str, Any]) -> HttpResponse:
        batch = body.get("batch")
        if type(batch) is not list or not batch:
            raise ApiError(400, "batch must be a non-empty list")
        if len(batch) > MAX_BATCH:
            raise ApiError(400, f"At most {MAX_BATCH} events per batch")
        events = []
        for item in batch:
            if type(item) is not dict:
                raise ApiError(400, "Each batch item must be an object")
            events.append((_event(app, item, [item.get("channel")]), _info(item.get("info"))))
        for event, _ in events:
            await self._trigger(app, event)
        if not any(info for _, info in events):
            return answer(200, {})
        results = []
        for event, info in events:
            infos = await self._infos(app, event.channels, info) if info else {}
            results.append(infos.get(event.channels[0], {}))
        return answer(200, {"batch": results})

    async def _trigger(self, app: PusherAppConfig, event: _Event) -> None:
        hub = self.hub
        bus = hub.bus
        cache = []
        for name in event.channels:
            payload = pusher.frame(event.name, event.data, name)
            bus.post(hub.keys.bus_pusher(app.id, name), envelope.message(payload, event.socket_id))
            if pusher.channel(name).cache:
                cache.append(self.state.cache_command(app.id, name, payload))
        if cache:
            await hub.registry.redis.pipeline(cache)
        await hub.relieved()  # as the hub's publishers do: wait for Redis to catch up

    async def _infos(
        self, app: PusherAppConfig, channels: list[str], info: set[str]
    ) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {name: {} for name in channels}
        if "subscription_count" in info:
            for name in channels:
                result[name]["subscription_count"] = await self.state.subscriptions(app.id, name)
        if "user_count" in info:
            presence = [n for n in channels if pusher.channel(n).kind is Kind.PRESENCE]
            counts = await self.state.user_counts(app.id, presence)
            for name, count in zip(presence, counts, strict=True):
                result[name]["user_count"] = count
        return result

    # Queries

    async def _channels(self, app: PusherAppConfig, params: dict[str, str]) -> HttpResponse:
        prefix = params.get("filter_by_prefix", "")
        info = _info(params.get("info"))
        if "user_count" in info and not prefix.startswith("presence-"):
            raise ApiError(400, "info=user_count needs filter_by_prefix=presence-")
        occupied = await self.state.occupied(app.id)
        names = sorted(n for n in occupied if n.startswith(prefix) and not n.startswith("#"))
        listed: dict[str, dict[str, int]] = {name: {} for name in names}
        if "user_count" in info:
            for name, count in zip(names, await self.state.user_counts(app.id, names), strict=True):
                listed[name]["user_count"] = count
        return answer(200, {"channels": listed})

    async def _channel(
        self, app: PusherAppConfig, name: str, params: dict[str, str]
    ) -> HttpResponse:
        channel = _channel(name)
        info = _info(params.get("info"))
        if "user_count" in info and channel.kind is not Kind.PRESENCE:
            raise ApiError(400, "user_count is for presence channels only")
        subscriptions = await self.state.subscriptions(app.id, name)
        body: dict[str, Any] = {"occupied": subscriptions > 0}
        if "subscription_count" in info:
            body["subscription_count"] = subscriptions
        if "user_count" in info:
            body["user_count"] = (await self.state.user_counts(app.id, [name]))[0]
        return answer(200, body)

    async def _users(self, app: PusherAppConfig, name: str) -> HttpResponse:
        if _channel(name).kind is not Kind.PRESENCE:
            raise ApiError(400, "Users are listed for presence channels only")
        ids = await self.state.member_ids(app.id, name)
        return answer(200, {"users": [{"id": user_id} for user_id in sorted(ids)]})

    async def _terminate(self, app: PusherAppConfig, user_id: str) -> HttpResponse:
        """Close every connection signed in as `user_id` (`pusher:signin`), on any worker
        or node, with 4009."""
        hub = self.hub
        redis = hub.registry.redis
        cids: list[str] = await redis.execute(
            "HKEYS", hub.keys.pusher_topic(app.id, pusher.user_channel(user_id))
        )
        if cids:
            workers = await redis.pipeline([("HGET", hub.keys.conn(cid), "worker") for cid in cids])
            by_worker: dict[str, list[str]] = {}
            for cid, wid in zip(cids, workers, strict=True):
                if wid is not None:
                    by_worker.setdefault(wid, []).append(cid)
            payload = pusher.error_frame("Connection terminated", Close.UNAUTHORIZED)
            for wid, targets in by_worker.items():
                data = envelope.disconnect(payload, Close.UNAUTHORIZED, "terminated", targets)
                hub.bus.post(hub.keys.bus_worker(wid), data)
        return answer(200, {})


class _Event:
    """One event to trigger, checked."""

    __slots__ = ("channels", "data", "name", "socket_id")

    def __init__(self, name: str, data: str, channels: list[str], socket_id: str | None) -> None:
        self.name = name
        self.data = data
        self.channels = channels
        self.socket_id = socket_id


def _event(app: PusherAppConfig, body: dict[str, Any], channels: Any) -> _Event:
    name = body.get("name")
    if type(name) is not str or not name or len(name) > pusher.MAX_EVENT_NAME_LENGTH:
        raise ApiError(400, f"name must be 1-{pusher.MAX_EVENT_NAME_LENGTH} characters")
    if type(channels) is not list or not channels:
        raise ApiError(400, "channels must be a non-empty list")
    if len(channels) > MAX_CHANNELS_PER_EVENT:
        raise ApiError(400, f"At most {MAX_CHANNELS_PER_EVENT} channels per event")
    for channel in channels:
        _channel(channel)
    data = body.get("data", "")
    if type(data) is not str:  # the libraries send a string; anything else as its JSON
        data = orjson.dumps(data).decode()
    if len(data.encode()) > app.max_event_bytes:
        raise ApiError(413, f"Event data over {app.max_event_bytes} bytes")
    socket_id = body.get("socket_id")
    if socket_id is not None and not pusher.valid_socket_id(socket_id):
        raise ApiError(400, f"Invalid socket_id {socket_id!r}")
    return _Event(name, data, list(channels), socket_id)


def _channel(name: Any) -> pusher.Channel:
    try:
        return pusher.channel(name)
    except pusher.PusherError as exc:
        raise ApiError(400, str(exc)) from None


def _info(value: Any) -> set[str]:
    if value is None or value == "":
        return set()
    if type(value) is not str:
        raise ApiError(400, "info must be a comma-separated string")
    info = {item.strip() for item in value.split(",") if item.strip()}
    unknown = info - {"user_count", "subscription_count"}
    if unknown:
        raise ApiError(400, f"Unknown info: {', '.join(sorted(unknown))}")
    return info


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "The body must be JSON") from None
    if type(body) is not dict:
        raise ApiError(400, "The body must be a JSON object")
    return body


def _method(method: str, expected: str) -> None:
    if method != expected:
        raise ApiError(405, f"Use {expected}")
