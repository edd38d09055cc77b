"""The bench's Pusher side with no server: its frames pinned byte for byte and read with
the server's own parser, its subscriptions signed as Pusher's Python library signs them,
and its accounting of client events, which never come back to their sender."""

from __future__ import annotations

import time

import orjson
import pusher as pusher_library
import pytest

from shoal.bench import pusherwire
from shoal.bench.client import Client
from shoal.bench.drivers import PusherStreamDriver, check_templates, stream_template
from shoal.bench.meter import Meter
from shoal.bench.orchestrator import RunOutcome
from shoal.bench.plan import RunPlan
from shoal.bench.summary import summarize
from shoal.core import pusher

_PAYLOAD = b'{"src":0,"seq":7,"ts":9,"pad":"xx"}'


def _plan(publishers: int = 1, max_inflight: int = 32) -> RunPlan:
    return RunPlan("fanout", "ws://127.0.0.1:1/app/the-key", 4, 1, publishers=publishers,
                   max_inflight=max_inflight, size=2, room="bench-1", protocol="pusher",
                   pusher_secret="secret")  # fmt: skip


def test_client_events_keep_their_wire_format() -> None:
    plan = _plan()
    frame = stream_template(plan, 0) % (0, 7, 9)
    assert frame == b'{"event":"client-bench","channel":"private-bench-1","data":' + _PAYLOAD + b"}"
    check_templates(plan)
    parsed = pusher.parse(frame)  # the server's own parser
    assert (parsed.event, parsed.channel) == ("client-bench", "private-bench-1")
    assert pusher.channel(parsed.channel).takes_client_events


def test_subscriptions_are_signed_as_pushers_library_signs_them() -> None:
    frame = orjson.loads(pusherwire.subscribe("the-key", "secret", "123.456", "private-bench-1"))
    library = pusher_library.Pusher(app_id="1", key="the-key", secret="secret")
    expected = library.authenticate(channel="private-bench-1", socket_id="123.456")
    assert frame == {
        "event": "pusher:subscribe",
        "data": {"channel": "private-bench-1", "auth": expected["auth"]},
    }


def test_the_welcome_gives_the_socket_id() -> None:
    established = {"event": "pusher:connection_established",
                   "data": '{"socket_id":"12.34","activity_timeout":30}'}  # fmt: skip
    assert pusherwire.socket_id(established) == "12.34"
    for data in ('{"socket_id":"nope"}', "not json", {"activity_timeout": 30}):
        with pytest.raises(ValueError, match="socket_id"):
            pusherwire.socket_id({"event": "pusher:connection_established", "data": data})
    error = {
        "event": "pusher:error",
        "data": {"code": 4001, "message": "Application does not exist"},
    }
    assert pusherwire.error(error) == (4001, "Application does not exist")
    assert pusherwire.error({"event": "pusher:error", "data": "gone"}) == (None, "gone")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ws://127.0.0.1:1/ws", "path is /app/{key}"),
        ("ws://127.0.0.1:1/app/", "path is /app/{key}"),
        ("ws://127.0.0.1:1/app/k/x", "path is /app/{key}"),
    ],
)
def test_a_pusher_plan_needs_an_app_url(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RunPlan("fanout", url, 4, 1, protocol="pusher", pusher_secret="s")


def test_a_pusher_plan_refuses_what_pusher_cannot_do() -> None:
    with pytest.raises(ValueError, match="not echo"):
        RunPlan("echo", "ws://127.0.0.1:1/app/k", 4, 1, protocol="pusher")
    with pytest.raises(ValueError, match="--pusher-secret"):
        RunPlan("fanout", "ws://127.0.0.1:1/app/k", 4, 1, protocol="pusher")
    with pytest.raises(ValueError, match="unknown protocol"):
        RunPlan("fanout", "ws://127.0.0.1:1/ws", 4, 1, protocol="mqtt")
    # Connecting needs no secret, and the URL gets protocol=7 as pusher-js sends it.
    plan = RunPlan("connect", "ws://127.0.0.1:1/app/k?client=js", 4, 1, protocol="pusher")
    assert plan.url_for(0) == "ws://127.0.0.1:1/app/k?client=js&protocol=7"
    plan = RunPlan("connect", "ws://127.0.0.1:1/app/k?protocol=7", 4, 1, protocol="pusher")
    assert plan.url_for(3) == "ws://127.0.0.1:1/app/k?protocol=7"


class _Sink:
    """Where the clients would hand their frames: the test calls the driver itself."""

    def on_message(self, client: Client, payload: bytes) -> None:
        raise AssertionError("not connected")

    def on_disconnect(self, client: Client) -> None:
        raise AssertionError("not connected")


def _delivery(seq: int, *, source: int = 0, as_string: bool = False) -> bytes:
    data: object = {"src": source, "seq": seq, "ts": time.monotonic_ns(), "pad": "xx"}
    if as_string:
        data = orjson.dumps(data).decode()
    return orjson.dumps({"event": "client-bench", "channel": "private-bench-1", "data": data})


def test_a_publisher_is_paced_by_another_connection_and_never_gets_its_own() -> None:
    """Publisher 0 and subscribers 2, 3 in one load process (1 is another publisher)."""
    plan = _plan(publishers=2, max_inflight=2)
    sink = _Sink()
    clients = {i: Client(i, sink) for i in (0, 2, 3)}
    meter = Meter(time.monotonic_ns(), 0, 60, 10**9)
    driver = PusherStreamDriver(plan, clients, meter)
    driver.start()
    assert driver.sent_by_source() == {0: 2}  # its window, and no more
    driver.on_message(clients[3], _delivery(0))  # not its witness: no acknowledgement
    assert driver.sent_by_source() == {0: 2}
    driver.on_message(clients[2], _delivery(0))  # its witness, the next connection
    assert driver.sent_by_source() == {0: 3}
    driver.on_message(clients[0], _delivery(1))  # its own, back: not an acknowledgement
    assert driver.sent_by_source() == {0: 3}
    driver.on_message(clients[2], _delivery(1, as_string=True))  # data as a JSON string
    driver.on_message(clients[3], _delivery(1, as_string=True))
    assert driver.sent_by_source() == {0: 4}
    driver.on_message(clients[3], b'{"event":"pusher:error","data":{"code":4301,"message":"no"}}')
    driver.stop()
    outcome = RunOutcome(plan, traffic=driver.report(), sent_by_source={0: 2, 1: 0})
    outcome.connect.connected = outcome.connect.attempted = 3
    integrity = summarize(outcome, "A")["integrity"]
    assert integrity["expected"] == integrity["received"] == 4  # 2 subscribers, 2 each
    assert integrity["unexpected"] == 1  # the copy that came back to its sender
    assert integrity["mismatches"] == 0
    assert integrity["server_errors"] == {"4301: no": 1}
