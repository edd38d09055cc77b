"""The Pusher endpoint's WebSocket side against a live two-worker server, spoken with
plain `websockets` and signed with Pusher's own Python server library (`pusher`), so
that neither end is shoal's code."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pusher as pusher_library
import pytest
from pushers import PusherSocket, app_url, pusher_client, spread_clients
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from shoal.core.emitter import AsyncEmitter

from support import SCALE, RedisServer, Shoal, eventually, upgrade_request

APP_ID, KEY, SECRET = "4242", "shoal-key", "shoal-secret-0123456789"
PUSHER_APPS = {"apps": [{"id": APP_ID, "key": KEY, "secret": SECRET}]}


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "pusher": PUSHER_APPS}


@pytest.fixture
def signer() -> pusher_library.Pusher:
    return pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)


def presence_auth(signer: pusher_library.Pusher, c: PusherSocket, channel: str,
                  user_id: Any, info: Any = None) -> dict[str, Any]:  # fmt: skip
    data: dict[str, Any] = {"user_id": user_id}
    if info is not None:
        data["user_info"] = info
    return dict(signer.authenticate(channel=channel, socket_id=c.socket_id, custom_data=data))


async def test_connection_established_and_ping(shoal: Shoal) -> None:
    async with pusher_client(shoal, KEY) as c:
        assert c.socket_id.count(".") == 1 and c.socket_id.replace(".", "").isdigit()
        assert c.activity_timeout == 30
        await c.send("pusher:ping", {})
        assert (await c.recv())["event"] == "pusher:pong"


async def test_an_unknown_key_is_told_4001_and_closed_with_it(shoal: Shoal) -> None:
    async with connect(app_url(shoal, "nope")) as ws:
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
    async with pusher_client(shoal, KEY) as c:
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
    async with spread_clients(shoal, KEY, 3) as (ann, bo, ann_again):
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


async def test_signin_is_checked_and_malformed_signin_data_is_refused(
    shoal: Shoal, signer: pusher_library.Pusher
) -> None:
    """`pusher:signin` data as pusher-js sends it (an object) or JSON-encoded; malformed
    data is answered with an error the connection survives; a signature made for another
    socket is refused with 4009, which closes the connection."""
    async with pusher_client(shoal, KEY) as c:
        bad: object
        for bad, message in (
            ("{", "Invalid signin data"),
            ([], "Invalid signin data"),
            ({"auth": "k:s"}, "user_data must be a JSON string"),
            ({"user_data": {"id": "7"}}, "user_data must be a JSON string"),
        ):
            await c.send("pusher:signin", bad)
            assert (await c.expect("pusher:error"))["data"]["message"] == message
        signed = signer.authenticate_user(c.socket_id, {"id": "7"})
        await c.send("pusher:signin", json.dumps(signed))
        success = await c.expect("pusher:signin_success")
        assert success["data"] == {"user_data": signed["user_data"]}

    async with pusher_client(shoal, KEY) as c:
        await c.send("pusher:signin", signer.authenticate_user("1.1", {"id": "8"}))
        refused = await c.expect("pusher:error")
        assert refused["data"] == {"code": 4009, "message": "Invalid signature"}
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4009


async def test_client_events_reach_other_subscribers_only(
    shoal: Shoal, signer: pusher_library.Pusher
) -> None:
    channel = "presence-typing"
    async with spread_clients(shoal, KEY, 2) as (ann, bo):
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
    async with spread_clients(shoal, KEY, 2) as (ann, bo):
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
    async with pusher_client(shoal, KEY) as c:
        shoal.signal(signal.SIGHUP)
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv(timeout=30)  # nothing comes before the close
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4200


async def test_members_of_a_killed_worker_are_removed_by_the_sweep(
    shoal: Shoal, signer: pusher_library.Pusher, redis_server: RedisServer, prefix: str
) -> None:
    channel = "presence-crash"
    async with spread_clients(shoal, KEY, 2) as (ann, bo):
        await ann.subscribe(channel, **presence_auth(signer, ann, channel, "ann"))
        await bo.subscribe(channel, **presence_auth(signer, bo, channel, "bo"))
        await ann.expect("pusher_internal:member_added")
        # A worker id ends with its pid.
        worker = str(redis_server.client().hget(f"{prefix}:conn:{bo.socket_id}", "worker"))
        os.kill(int(worker.rsplit(".", 1)[1]), signal.SIGKILL)
        removed = await ann.expect("pusher_internal:member_removed", timeout=30)
        assert removed["data"] == {"user_id": "bo"}

    async def alone() -> bool:
        async with pusher_client(shoal, KEY) as c:
            joined = await c.subscribe(channel, **presence_auth(signer, c, channel, "probe"))
            return bool(joined["data"]["presence"]["ids"] == ["probe"])

    await eventually(alone, 10, "no ghost members")


async def test_the_emitter_reaches_pusher_channels(
    shoal: Shoal, redis_server: RedisServer, prefix: str
) -> None:
    emitter = AsyncEmitter(redis_server.url, prefix)
    try:
        async with spread_clients(shoal, KEY, 2) as (ann, bo):
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

    def __init__(self, signer: pusher_library.Pusher, refuse: int = 0) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                receiver.posts += 1
                if receiver.posts <= refuse:  # a receiver that is down for a moment
                    self.send_response(503)
                    self.end_headers()
                    return
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
    async with spread_clients(webhook_shoal, KEY, 2) as (ann, bo):
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
    # Each transition is its own job: the task pool may deliver them in any order.
    rest = {((e := await receiver.next())["name"], e["channel"]) for _ in range(5)}
    assert rest == {
        ("cache_miss", "cache-empty"),
        ("channel_occupied", "cache-empty"),
        ("member_removed", channel),
        ("channel_vacated", channel),
        ("channel_vacated", "cache-empty"),
    }
    await receiver.nothing()


def server_frames(wire: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames a server sent, up to the first cut short."""
    frames, at = [], wire.index(b"\r\n\r\n") + 4  # after the 101
    while at + 2 <= len(wire):
        opcode, length = wire[at] & 0x0F, wire[at + 1] & 0x7F
        at += 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length, at = int.from_bytes(wire[at : at + size], "big"), at + size
        frames.append((opcode, wire[at : at + length]))
        at += length
    return frames


async def test_a_client_that_stops_answering_is_closed_with_4201(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    settings["server"].update(heartbeat_check_interval=0.5, heartbeat_idle_time=1.5)
    node = Shoal(tmp_path, settings).start()
    try:
        # A hand-made client that answers nothing, not even the server's pings.
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(upgrade_request(f"/app/{KEY}?protocol=7"))
        async with asyncio.timeout(10 * SCALE):
            wire = await reader.read(-1)  # until the server ends the connection
        writer.close()
    finally:
        node.stop()
    frames = server_frames(wire)
    assert json.loads(frames[0][1])["event"] == "pusher:connection_established"
    assert 0x9 in [opcode for opcode, _ in frames]  # pinged first
    assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][1][:2], "big") == 4201


async def test_each_apps_limits_and_channels_are_its_own(
    tmp_path: Path, settings: dict[str, Any], signer: pusher_library.Pusher
) -> None:
    apps = [
        {"id": APP_ID, "key": KEY, "secret": SECRET},
        {"id": "2", "key": "small", "secret": SECRET, "max_connections": 1,
         "client_events": "off"},
        {"id": "3", "key": "off", "secret": SECRET, "enabled": False},
        {"id": "4", "key": "site", "secret": SECRET, "allowed_origins": ["https://app.test"]},
    ]  # fmt: skip
    node = Shoal(tmp_path, {**settings, "pusher": {"apps": apps}}).start()
    small = pusher_library.Pusher(app_id="2", key="small", secret=SECRET)
    try:
        async with pusher_client(node, KEY) as ann, pusher_client(node, "small") as bo:
            # Two apps, one channel name: neither sees the other's events.
            await ann.subscribe("private-x", **signer.authenticate("private-x", ann.socket_id))
            await bo.subscribe("private-x", **small.authenticate("private-x", bo.socket_id))
            await bo.send("client-hi", {}, "private-x")  # client events are off for app 2
            assert (await bo.expect("pusher:error"))["data"]["code"] == 4301
            await ann.silent()

            # Over app 2's max_connections: told 4004, and closed with it.
            async with connect(app_url(node, "small")) as third:
                error = json.loads(await third.recv())
                assert error["data"]["code"] == 4004
                with pytest.raises(ConnectionClosed) as closed:
                    await third.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004

        for key, origin, code in (("off", None, 4003), ("site", "https://evil.test", 4009)):
            headers = {"Origin": origin} if origin else {}
            async with connect(app_url(node, key), additional_headers=headers) as refused:
                assert json.loads(await refused.recv())["data"]["code"] == code
                with pytest.raises(ConnectionClosed) as closed:
                    await refused.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code
        async with connect(app_url(node, "site"), origin=Origin("https://app.test")) as welcome:
            assert "connection_established" in await welcome.recv()
    finally:
        node.stop()


async def test_presence_and_encrypted_channels_refuse_what_pusher_refuses(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    app = {"id": "2", "key": "small", "secret": SECRET, "max_presence_members": 1}
    node = Shoal(tmp_path, {**settings, "pusher": {"apps": [app]}}).start()
    # The library signs encrypted channels only with a master key (the server never sees it).
    master = base64.b64encode(b"k" * 32).decode()
    small = pusher_library.Pusher(app_id="2", key="small", secret=SECRET,
                                  encryption_master_key_base64=master)  # fmt: skip
    try:
        async with spread_clients(node, "small", 2) as (ann, bo):
            await ann.subscribe("presence-p", **small.authenticate(
                "presence-p", ann.socket_id, {"user_id": "ann"}))  # fmt: skip
            await bo.send("pusher:subscribe", {"channel": "presence-p", **small.authenticate(
                "presence-p", bo.socket_id, {"user_id": "bo"})})  # fmt: skip
            refused = await bo.expect("pusher:subscription_error")
            assert refused["channel"] == "presence-p" and refused["data"]["status"] == 403
            await ann.silent()  # no member_added for a member refused

            name = "private-encrypted-x"
            for c in (ann, bo):
                await c.subscribe(name, auth=small.authenticate(name, c.socket_id)["auth"])
            await ann.send("client-e", {"ciphertext": "..."}, name)
            assert (await ann.expect("pusher:error"))["data"]["code"] == 4301
            await bo.silent()
    finally:
        node.stop()


async def test_a_dead_workers_last_subscriber_fires_vacated_once(
    webhook_shoal: Shoal,
    signer: pusher_library.Pusher,
    receiver: WebhookReceiver,
    redis_server: RedisServer,
    prefix: str,
) -> None:
    channel = "presence-doomed"
    async with pusher_client(webhook_shoal, KEY) as ann:
        await ann.subscribe(channel, **presence_auth(signer, ann, channel, "ann"))
        assert (await receiver.next())["name"] == "channel_occupied"
        assert (await receiver.next())["name"] == "member_added"
        worker = str(redis_server.client().hget(f"{prefix}:conn:{ann.socket_id}", "worker"))
        os.kill(int(worker.rsplit(".", 1)[1]), signal.SIGKILL)
        # The master tells the housekeeper, which removes the state and fires these once.
        gone = {(await receiver.next(timeout=30))["name"] for _ in range(2)}
        assert gone == {"member_removed", "channel_vacated"}
        await receiver.nothing()


async def test_a_webhook_refused_with_503_is_delivered_by_a_retry(
    tmp_path: Path, settings: dict[str, Any], signer: pusher_library.Pusher
) -> None:
    hooks = WebhookReceiver(signer, refuse=1)
    app = {"id": APP_ID, "key": KEY, "secret": SECRET, "webhooks": [{"url": hooks.url}]}
    tasks = {"task_worker_num": 1, "retry_backoff": 0.2}
    node = Shoal(tmp_path, {**settings, "pusher": {"apps": [app]}, "tasks": tasks}).start()
    try:
        async with pusher_client(node, KEY) as ann:
            await ann.subscribe("news", auth="")
            assert await hooks.next() == {"name": "channel_occupied", "channel": "news"}
            assert hooks.posts == 2  # the first was refused, the retry delivered it
    finally:
        node.stop()
        hooks.server.shutdown()
