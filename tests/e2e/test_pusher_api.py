"""The Pusher endpoint's HTTP API against live servers, called by Pusher's Python server
library 3.3.4 and, for what the library never sends, by hand-signed requests."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from typing import Any
from urllib.parse import urlencode

import pusher as pusher_library
import pytest
from pushers import PusherSocket, pusher_client, spread_clients

from shoal.core import metrics, pusher

from support import Shoal, scrape, wait_until, workers_replaced

APP_ID, KEY, SECRET = "4242", "shoal-key", "shoal-secret-0123456789"
OFF_ID, OFF_KEY = "77", "off-key"
APPS = {
    "apps": [
        {"id": APP_ID, "key": KEY, "secret": SECRET, "max_event_bytes": 1000},
        {"id": OFF_ID, "key": OFF_KEY, "secret": SECRET, "enabled": False},
    ]
}


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "pusher": APPS}


def library_for(node: Shoal) -> pusher_library.Pusher:
    return pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1",
                                 port=node.port, ssl=False)  # fmt: skip


@pytest.fixture
def library(shoal: Shoal) -> pusher_library.Pusher:
    return library_for(shoal)


def signed(method: str, path: str, body: bytes = b"", *, key: str = KEY, secret: str = SECRET,
           timestamp: int | None = None, **extra: str) -> str:  # fmt: skip
    """`path` with a query string signed as the server libraries sign it."""
    params = {"auth_key": key, "auth_timestamp": str(timestamp or int(time.time())),
              "auth_version": "1.0", **extra}  # fmt: skip
    if body:
        params["body_md5"] = pusher.body_md5(body)
    params["auth_signature"] = pusher.request_signature(secret, method, path, params)
    return f"{path}?{urlencode(params)}"


def call(node: Shoal, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        connection.request(method, target, body=body or None,
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def presence_auth(c: PusherSocket, channel: str, user_id: str) -> dict[str, Any]:
    signer = pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)
    return dict(signer.authenticate(channel, c.socket_id, {"user_id": user_id}))


async def test_trigger_batch_and_channel_queries(
    shoal: Shoal, library: pusher_library.Pusher
) -> None:
    async with spread_clients(shoal, KEY, 2) as (ann, bo):
        for c in (ann, bo):
            await c.subscribe("news", auth="")
        await ann.subscribe("presence-room", **presence_auth(ann, "presence-room", "1"))
        await bo.subscribe("presence-room", **presence_auth(bo, "presence-room", "2"))
        await ann.expect("pusher_internal:member_added")

        # The library 3.3.4 sends no `info`: signed here as it would.
        event = json.dumps({"name": "e", "channels": ["news", "presence-room"], "data": "{}",
                            "info": "user_count,subscription_count"}).encode()  # fmt: skip
        status, info = call(shoal, "POST", signed("POST", f"/apps/{APP_ID}/events", event), event)
        assert status == 200
        assert info == {"channels": {"news": {"subscription_count": 2},
                                     "presence-room": {"subscription_count": 2,
                                                       "user_count": 2}}}  # fmt: skip
        for c in (ann, bo):
            assert {(await c.expect("e"))["channel"] for _ in range(2)} == {"news", "presence-room"}

        batch = [
            {"channel": "news", "name": "b1", "data": "one"},
            {"channel": "news", "name": "b2", "data": "two", "socket_id": bo.socket_id},
        ]
        assert library.trigger_batch(batch) == {}
        assert [(await ann.recv())["event"] for _ in range(2)] == ["b1", "b2"]
        assert (await bo.recv())["event"] == "b1"
        await bo.silent()

        assert library.channels_info() == {"channels": {"news": {}, "presence-room": {}}}
        assert library.channels_info(prefix_filter="presence-", attributes=["user_count"]) == {
            "channels": {"presence-room": {"user_count": 2}}}  # fmt: skip
        assert library.channel_info("news", ["subscription_count"]) == {
            "occupied": True, "subscription_count": 2}  # fmt: skip
        assert library.channel_info("empty") == {"occupied": False}
        assert library.users_info("presence-room") == {"users": [{"id": "1"}, {"id": "2"}]}


def test_refusals_carry_pushers_statuses(shoal: Shoal) -> None:
    event = json.dumps({"name": "e", "channels": ["news"], "data": "x"}).encode()
    path = f"/apps/{APP_ID}/events"
    assert call(shoal, "POST", signed("POST", path, event), event)[0] == 200
    # Signed with another secret, for another body, too long ago, by an unknown key.
    assert call(shoal, "POST", signed("POST", path, event, secret="x" * 20), event)[0] == 401
    assert call(shoal, "POST", signed("POST", path, b'{"other": 1}'), event)[0] == 401
    stale = signed("POST", path, event, timestamp=int(time.time()) - 601)
    status, body = call(shoal, "POST", stale, event)
    assert status == 401 and "Timestamp expired" in body["error"]
    assert call(shoal, "POST", signed("POST", path, event, key="who"), event)[0] == 401
    assert call(shoal, "POST", f"{path}?auth_key={KEY}", event)[0] == 401  # unsigned

    assert call(shoal, "POST", signed("POST", "/apps/999/events", event), event)[0] == 404
    off = f"/apps/{OFF_ID}/events"
    assert call(shoal, "POST", signed("POST", off, event, key=OFF_KEY), event)[0] == 403
    big = json.dumps({"name": "e", "channels": ["news"], "data": "x" * 1001}).encode()
    assert call(shoal, "POST", signed("POST", path, big), big)[0] == 413
    malformed = [
        {"name": "e", "channels": []},
        {"name": "e", "channels": ["a b"], "data": ""},
        {"name": "e", "channels": ["a"], "socket_id": "x"},
        {"name": "", "channels": ["a"]},
    ]
    for bad in (b"[1]", b"{not json", *(json.dumps(m).encode() for m in malformed)):
        status, body = call(shoal, "POST", signed("POST", path, bad), bad)
        assert status == 400, (bad, body)
    channels = f"/apps/{APP_ID}/channels"
    assert call(shoal, "POST", signed("POST", channels, event), event)[0] == 405
    status, body = call(shoal, "GET", signed("GET", channels, info="user_count"))
    assert status == 400 and "filter_by_prefix" in body["error"]
    assert call(shoal, "GET", signed("GET", f"{channels}/news/users"))[0] == 400
    assert call(shoal, "GET", signed("GET", f"/apps/{APP_ID}/nothing"))[0] == 404

    # Each answer is counted by its status, on whichever worker gave it.
    answered = {"200": 1, "400": 8, "401": 5, "403": 1, "404": 2, "405": 1, "413": 1}
    seen: dict[str, float] = {}

    def counted() -> bool:
        samples = scrape(shoal)
        seen.clear()
        for status in metrics.HTTP_STATUSES:
            if samples["shoal_http_requests_total", status]:
                seen[status] = samples["shoal_http_requests_total", status]
        return seen == answered

    try:
        wait_until(counted, 5, "every answer counted by its status")
    except AssertionError:
        assert seen == answered
        raise


def test_gets_on_a_kept_alive_connection(shoal: Shoal) -> None:
    """A GET first on its connection goes through the WebSocket handshake's parser; one
    after a POST on a kept-alive connection reaches the HTTP exchange: both answer."""
    event = json.dumps({"name": "e", "channel": "news", "data": "x"}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", shoal.port, timeout=10)
    try:
        connection.request("POST", signed("POST", f"/apps/{APP_ID}/events", event), body=event)
        assert connection.getresponse().read() == b"{}"
        connection.request("GET", signed("GET", f"/apps/{APP_ID}/channels/news"))
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"occupied": False}
    finally:
        connection.close()
    status, body = call(shoal, "GET", signed("GET", f"/apps/{APP_ID}/channels/news"))
    assert (status, body) == (200, {"occupied": False})


async def test_two_nodes_on_one_redis_are_one_pusher_server(nodes: tuple[Shoal, Shoal]) -> None:
    a, b = nodes
    async with pusher_client(a, KEY) as ann, pusher_client(b, KEY) as bo:
        channel = "presence-span"
        await ann.subscribe(channel, **presence_auth(ann, channel, "ann"))
        joined = await bo.subscribe(channel, **presence_auth(bo, channel, "bo"))
        assert sorted(joined["data"]["presence"]["ids"]) == ["ann", "bo"]
        assert (await ann.expect("pusher_internal:member_added"))["data"]["user_id"] == "bo"

        # Triggered on node a, bo's socket (on node b) left out; and the other way round.
        library_for(a).trigger(channel, "e", "from a", socket_id=bo.socket_id)
        assert (await ann.expect("e"))["data"] == "from a"
        await bo.silent()
        library_for(b).trigger(channel, "e", "from b", socket_id=ann.socket_id)
        assert (await bo.expect("e"))["data"] == "from b"
        await ann.silent()
        assert library_for(a).users_info(channel) == {"users": [{"id": "ann"}, {"id": "bo"}]}

        await bo.ws.close()
        assert (await ann.expect("pusher_internal:member_removed"))["data"] == {"user_id": "bo"}


def test_triggers_through_a_rolling_reload_all_succeed(
    shoal: Shoal, library: pusher_library.Pusher
) -> None:
    """A Laravel app broadcasts back to back while every worker is replaced (SIGHUP): the
    library's keep-alive connection to an old worker gets its request under way answered,
    with `Connection: close`, and its next goes to a new worker. No trigger fails."""
    old = set(shoal.worker_pids())
    sent = 0
    failures: list[str] = []
    stop = threading.Event()

    def broadcast() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                library.trigger("news", "tick", {"n": sent})
            except Exception as exc:  # what the app would see: any of them fails the test
                failures.append(repr(exc))
            sent += 1

    thread = threading.Thread(target=broadcast)
    thread.start()
    try:
        wait_until(lambda: sent >= 20, 10, "triggers before the reload")
        shoal.signal(signal.SIGHUP)
        wait_until(lambda: workers_replaced(shoal, old), 30, "every worker replaced")
        before = sent
        wait_until(lambda: sent >= before + 20, 10, "triggers after the reload")
    finally:
        stop.set()
        thread.join(30)
    assert failures == [], f"{len(failures)} of {sent} triggers failed: {failures[:3]}"
