"""The Pusher endpoint's WebSocket side against a live two-worker server, spoken with
plain `websockets` and signed with Pusher's own Python server library (`pusher`), so
that neither end is shoal's code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pusher as pusher_library
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.core.emitter import AsyncEmitter

from support import SCALE, RedisServer, Shoal, eventually

APP_ID, KEY, SECRET = "4242", "shoal-key", "shoal-secret-0123456789"
PUSHER_APPS = {"apps": [{"id": APP_ID, "key": KEY, "secret": SECRET}]}


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "pusher": PUSHER_APPS}


@pytest.fixture
def signer() -> pusher_library.Pusher:
    return pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)


class PusherSocket:
    """A Pusher client speaking protocol 7 over plain websockets."""

    def __init__(self, ws: ClientConnection, established: dict[str, Any]) -> None:
        self.ws = ws
        self.socket_id: str = established["socket_id"]
        self.activity_timeout: int = established["activity_timeout"]

    @property
    def worker(self) -> str:
        return self.socket_id.split(".")[0]

    async def send(self, event: str, data: Any, channel: str | None = None) -> None:
        message: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            message["channel"] = channel
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message: dict[str, Any] = json.loads(await self.ws.recv())
        return message

    async def expect(self, event: str, timeout: float = 5) -> dict[str, Any]:
        """The next frame, which must be `event`; its `data` parsed when a string."""
        message = await self.recv(timeout)
        assert message["event"] == event, message
        data = message.get("data")
        if isinstance(data, str):
            with contextlib.suppress(ValueError):
                message["data"] = json.loads(data)
        return message

    async def silent(self, seconds: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            print(await self.recv(seconds))

    async def subscribe(self, channel: str, **auth: Any) -> dict[str, Any]:
        await self.send("pusher:subscribe", {"channel": channel, **auth})
        return await self.expect("pusher_internal:subscription_succeeded")


def app_url(shoal: Shoal, key: str = KEY) -> str:
    return shoal.url(path=f"/app/{key}").split("?")[0] + "?protocol=7&client=js&version=8.6.0"


@contextlib.asynccontextmanager
async def pusher_client(shoal: Shoal) -> AsyncIterator[PusherSocket]:
    async with connect(app_url(shoal)) as ws:
        first = json.loads(await ws.recv())
        assert first["event"] == "pusher:connection_established", first
        yield PusherSocket(ws, json.loads(first["data"]))


@contextlib.asynccontextmanager
async def spread_clients(shoal: Shoal, count: int) -> AsyncIterator[list[PusherSocket]]:
    """`count` clients, on both workers."""
    async with contextlib.AsyncExitStack() as stack:
        chosen: list[PusherSocket] = []
        for _ in range(200):
            c = await stack.enter_async_context(pusher_client(shoal))
            workers = {x.worker for x in chosen}
            if c.worker in workers and len(workers) < 2 and len(chosen) == count - 1:
                continue
            chosen.append(c)
            if len(chosen) == count:
                break
        assert len({c.worker for c in chosen}) == 2 or count == 1
        yield chosen


def presence_auth(signer: pusher_library.Pusher, c: PusherSocket, channel: str,
                  user_id: Any, info: Any = None) -> dict[str, Any]:  # fmt: skip
    data: dict[str, Any] = {"user_id": user_id}
    if info is not None:
        data["user_info"] = info
    return dict(signer.authenticate(channel=channel, socket_id=c.socket_id, custom_data=data))


async def test_connection_established_and_ping(shoal: Shoal) -> None:
    async with pusher_client(shoal) as c:
        assert c.socket_id.count(".") == 1 and c.socket_id.replace(".", "").isdigit()
        assert c.activity_timeout == 30
        await c.send("pusher:ping", {})
        assert (await c.recv())["event"] == "pusher:pong"


async def test_an_unknown_key_is_told_4001_and_closed_with_it(shoal: Shoal) -> None:
    async with connect(app_url(shoal, key="nope")) as ws:
        error = json.loads(await ws.recv())
        assert error == {
            "event": "pusher:error",
            "data": {"code": 4001, "message": "Application does not exist"},
        }
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_public_and_private_subscriptions(
    shoal: Shoal, signer: pusher_library.Pusher
) -> None:
    async with pusher_client(shoal) as c:
        assert (await c.subscribe("orders", auth=""))["channel"] == "orders"
        signed = signer.authenticate(channel="private-a", socket_id=c.socket_id)
        assert (await c.subscribe("private-a", **signed))["channel"] == "private-a"
        # Signed for another socket: refused, with the channel (Laravel Echo's .error()).
        other = signer.authenticate(channel="private-b", socket_id="1.1")
        await c.send("pusher:subscribe", {"channel": "private-b", **other})
        refused = await c.expect("pusher:subscription_error")
        assert refused["channel"] == "private-b"
        assert refused["data"]["status"] == 401
        await c.send("pusher:subscribe", {"channel": "private-c"})  # no auth at all
        assert (await c.expect("pusher:subscription_error"))["channel"] == "private-c"


async def test_presence_members_are_users_across_workers(
    shoal: Shoal, signer: pusher_library.Pusher
) -> None:
    channel = "presence-room"
    async with spread_clients(shoal, 3) as (ann, bo, ann_again):
        signed = presence_auth(signer, ann, channel, 1, {"n": "Ann"})
        joined = await ann.subscribe(channel, **signed)
        assert joined["data"]["presence"] == {"ids": ["1"], "hash": {"1": {"n": "Ann"}}, "count": 1}

        await bo.subscribe(channel, **presence_auth(signer, bo, channel, "bo"))
        added = await ann.expect("pusher_internal:member_added")
        assert added["channel"] == channel
        assert added["data"] == {"user_id": "bo", "user_info": None}

        # A user's second connection is no new member.
        again = await ann_again.subscribe(channel, **presence_auth(signer, ann_again, channel, 1,
                                                                   {"n": "Ann"}))  # fmt: skip
        assert sorted(again["data"]["presence"]["ids"]) == ["1", "bo"]
        assert again["data"]["presence"]["count"] == 2
        await bo.silent()

        # Nor is its leaving a removal, until the last one goes.
        await ann_again.send("pusher:unsubscribe", {"channel": channel})
        await bo.silent()
        await ann.ws.close()
        removed = await bo.expect("pusher_internal:member_removed")
        assert removed["data"] == {"user_id": "1"}


async def test_client_events_reach_other_subscribers_only(
    shoal: Shoal, signer: pusher_library.Pusher
) -> None:
    channel = "presence-typing"
    async with spread_clients(shoal, 2) as (ann, bo):
        await ann.subscribe(channel, **presence_auth(signer, ann, channel, "ann"))
        await bo.subscribe(channel, **presence_auth(signer, bo, channel, "bo"))
        await ann.expect("pusher_internal:member_added")
        await ann.send("client-typing", {"on": True}, channel)
        event = await bo.recv()
        assert event == {"event": "client-typing", "channel": channel, "data": {"on": True},
                         "user_id": "ann"}  # fmt: skip
        await ann.silent()  # never echoed

        await ann.subscribe("public", auth="")
        await ann.send("client-x", {}, "public")
        refused = await ann.expect("pusher:error")
        assert refused["data"]["code"] == 4301
        await ann.send("client-x", {}, "private-not-subscribed")
        assert (await ann.expect("pusher:error"))["data"]["code"] == 4301


async def test_client_events_over_the_rate_are_refused_with_4301(
    shoal: Shoal, signer: pusher_library.Pusher
) -> None:
    async with spread_clients(shoal, 2) as (ann, bo):
        for c in (ann, bo):
            await c.subscribe("private-x", **signer.authenticate("private-x", c.socket_id))
        for n in range(11):
            await ann.send("client-n", {"n": n}, "private-x")
        refused = await ann.expect("pusher:error")
        assert refused["data"]["code"] == 4301
        got = [(await bo.recv())["data"]["n"] for _ in range(10)]
        assert got == list(range(10))
        await bo.silent()


async def test_a_reload_closes_pusher_clients_with_4200(shoal: Shoal) -> None:
    async with pusher_client(shoal) as c:
        shoal.signal(signal.SIGHUP)
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv(timeout=30)  # nothing comes before the close
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4200


async def test_members_of_a_killed_worker_are_removed_by_the_sweep(
    shoal: Shoal, signer: pusher_library.Pusher, redis_server: RedisServer, prefix: str
) -> None:
    channel = "presence-crash"
    async with spread_clients(shoal, 2) as (ann, bo):
        await ann.subscribe(channel, **presence_auth(signer, ann, channel, "ann"))
        await bo.subscribe(channel, **presence_auth(signer, bo, channel, "bo"))
        await ann.expect("pusher_internal:member_added")
        # A worker id ends with its pid.
        worker = str(redis_server.client().hget(f"{prefix}:conn:{bo.socket_id}", "worker"))
        os.kill(int(worker.rsplit(".", 1)[1]), signal.SIGKILL)
        removed = await ann.expect("pusher_internal:member_removed", timeout=30)
        assert removed["data"] == {"user_id": "bo"}

    async def alone() -> bool:
        async with pusher_client(shoal) as c:
            joined = await c.subscribe(channel, **presence_auth(signer, c, channel, "probe"))
            return bool(joined["data"]["presence"]["ids"] == ["probe"])

    await eventually(alone, 10, "no ghost members")


async def test_the_emitter_reaches_pusher_channels(
    shoal: Shoal, redis_server: RedisServer, prefix: str
) -> None:
    emitter = AsyncEmitter(redis_server.url, prefix)
    try:
        async with spread_clients(shoal, 2) as (ann, bo):
            for c in (ann, bo):
                await c.subscribe("orders", auth="")
            assert await emitter.trigger(APP_ID, "orders", "shipped", {"id": 7}) == 2
            for c in (ann, bo):
                assert await c.expect("shipped") == {
                    "event": "shipped", "channel": "orders", "data": {"id": 7}}  # fmt: skip
            # Left out by socket_id, as the HTTP API's exclusion does.
            await emitter.trigger(APP_ID, "orders", "shipped", "raw", socket_id=ann.socket_id)
            assert (await bo.recv())["data"] == "raw"
            await ann.silent()
            await emitter.trigger(APP_ID, "cache-prices", "price", {"p": 3})
            cached = await ann.subscribe("cache-prices", auth="")
            assert cached["channel"] == "cache-prices"
            assert (await ann.expect("price"))["data"] == {"p": 3}
    finally:
        await emitter.close()


class WebhookReceiver:
    """An HTTP server that keeps the webhooks it receives, checked with the Python
    server library's `validate_webhook` (signature, key and age)."""

    def __init__(self, signer: pusher_library.Pusher) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                checked = signer.validate_webhook(
                    self.headers["X-Pusher-Key"], self.headers["X-Pusher-Signature"], body
                )
                self.send_response(200 if checked is not None else 401)
                self.end_headers()
                for event in (checked or {}).get("events", []):
                    events.put(event)

            def log_message(self, *args: Any) -> None:
                pass

        events = self.events
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    async def next(self, timeout: float = 10) -> dict[str, Any]:
        event: dict[str, Any] = await asyncio.to_thread(self.events.get, timeout=timeout * SCALE)
        return event

    async def nothing(self) -> None:
        with pytest.raises(queue.Empty):
            await asyncio.to_thread(self.events.get, timeout=0.5)


@pytest.fixture
def receiver(signer: pusher_library.Pusher) -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver(signer)
    yield hooks
    hooks.server.shutdown()


@pytest.fixture
def webhook_shoal(
    tmp_path: Path, settings: dict[str, Any], receiver: WebhookReceiver
) -> Iterator[Shoal]:
    app = {"id": APP_ID, "key": KEY, "secret": SECRET, "webhooks": [{"url": receiver.url}]}
    node = Shoal(
        tmp_path, {**settings, "pusher": {"apps": [app]}, "tasks": {"task_worker_num": 1}}
    ).start()
    yield node
    node.stop()


async def test_webhooks_fire_once_per_transition_across_workers(
    webhook_shoal: Shoal, signer: pusher_library.Pusher, receiver: WebhookReceiver
) -> None:
    channel = "presence-hooks"
    async with spread_clients(webhook_shoal, 2) as (ann, bo):
        await ann.subscribe(channel, **presence_auth(signer, ann, channel, "ann"))
        assert await receiver.next() == {"name": "channel_occupied", "channel": channel}
        assert await receiver.next() == {"name": "member_added", "channel": channel,
                                         "user_id": "ann"}  # fmt: skip
        await bo.subscribe(channel, **presence_auth(signer, bo, channel, "bo"))
        assert (await receiver.next())["user_id"] == "bo"  # member_added; not occupied again
        await ann.expect("pusher_internal:member_added")
        await bo.send("client-hi", {"x": 1}, channel)
        assert await receiver.next() == {"name": "client_event", "channel": channel,
                                         "event": "client-hi", "data": {"x": 1},
                                         "socket_id": bo.socket_id, "user_id": "bo"}  # fmt: skip
        await bo.send("pusher:unsubscribe", {"channel": channel})
        assert await receiver.next() == {"name": "member_removed", "channel": channel,
                                         "user_id": "bo"}  # fmt: skip
        await receiver.nothing()  # still occupied by ann
        await ann.expect("client-hi")
        await ann.expect("pusher_internal:member_removed")
        await ann.subscribe("cache-empty", auth="")
        await ann.expect("pusher:cache_miss")
        assert await receiver.next() == {"name": "cache_miss", "channel": "cache-empty"}
    rest = {((e := await receiver.next())["name"], e["channel"]) for _ in range(4)}
    assert rest == {
        ("channel_occupied", "cache-empty"),
        ("member_removed", channel),
        ("channel_vacated", channel),
        ("channel_vacated", "cache-empty"),
    }
    await receiver.nothing()
