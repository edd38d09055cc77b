"""The official Pusher clients against a live two-worker shoal: pusher-js 8.6.0 and
Laravel Echo 2.5.0 in Node (tests/interop/pusher_agent.mjs), with events triggered by
Pusher's Python server library and subscriptions signed by an auth endpoint that works as
Laravel's `/broadcasting/auth` does. No shoal code speaks on either side."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pusher as pusher_library
import pytest

from support import SCALE, Shoal, wait_until

INTEROP = Path(__file__).parents[1] / "interop"
APP_ID, KEY, SECRET = "1234", "echo-key", "echo-secret-0123456789"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (INTEROP / "node_modules" / "pusher-js").is_dir(),
    reason="needs Node.js and tests/interop's packages: run ./dev test (npm ci in tests/interop)",
)


def _node_version() -> tuple[int, ...]:
    found = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return tuple(
        int(part) for part in found.stdout.strip().lstrip("v").split(".")[:2] if part.isdigit()
    )


# Laravel Echo 2.5.0 is an ES module for Node 20.19 or newer ("engines" in its package).
needs_echo_node = pytest.mark.skipif(
    shutil.which("node") is None or _node_version() < (20, 19),
    reason="Laravel Echo 2.5.0 needs Node.js 20.19 or newer (./dev says which it found)",
)


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "pusher": {"apps": [{"id": APP_ID, "key": KEY, "secret": SECRET}]}}


@pytest.fixture
def library(shoal: Shoal) -> pusher_library.Pusher:
    return pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1",
                                 port=shoal.port, ssl=False)  # fmt: skip


class AuthEndpoint:
    """Signs subscriptions and sign-ins as a Laravel app's `/broadcasting/auth` and
    `/broadcasting/user-auth` do: the user is named in the endpoint's query string, and
    `mallory` may not subscribe to private channels."""

    def __init__(self) -> None:
        signer = pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                url = urlsplit(self.path)
                user = parse_qs(url.query)["user"][0]
                length = int(self.headers["Content-Length"])
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                socket_id = form["socket_id"]
                if url.path == "/user-auth":
                    body: Any = signer.authenticate_user(socket_id, {"id": user})
                elif user == "mallory":
                    self.send_response(403)
                    self.end_headers()
                    return
                elif form["channel_name"].startswith("presence-"):
                    member = {"user_id": user, "user_info": {"name": user.title()}}
                    body = signer.authenticate(form["channel_name"], socket_id, member)
                else:
                    body = signer.authenticate(form["channel_name"], socket_id)
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, user: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}?user={user}"


@pytest.fixture
def auth() -> Iterator[AuthEndpoint]:
    endpoint = AuthEndpoint()
    yield endpoint
    endpoint.server.shutdown()


class Agent:
    """One Node process running pusher-js (or Laravel Echo over it)."""

    def __init__(self, shoal: Shoal, auth: AuthEndpoint, user: str, *, echo: bool = False) -> None:
        self.user = user
        options = {"key": KEY, "host": "127.0.0.1", "port": shoal.port, "echo": echo,
                   "authEndpoint": auth.url("/auth", user),
                   "userAuthEndpoint": auth.url("/user-auth", user)}  # fmt: skip
        self.process = subprocess.Popen(
            ["node", str(INTEROP / "pusher_agent.mjs"), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.seen: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.socket_id = self.expect(lambda t: t["type"] == "connected")["socket_id"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.seen.put(json.loads(line))

    def send(self, op: str, **arguments: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()

    def expect(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The next thing seen that `match`es (others before it are skipped)."""
        try:
            while True:
                thing = self.seen.get(timeout=timeout * SCALE)
                if thing["type"] == "agent_error":
                    raise AssertionError(f"{self.user}: {thing['error']}")
                if match(thing):
                    return thing
        except queue.Empty:
            raise AssertionError(f"{self.user}: nothing matching within {timeout}s") from None

    def event(self, channel: str, event: str, timeout: float = 10) -> Any:
        """The data of the next `event` on `channel`."""
        thing = self.expect(lambda t: t["type"] == "event" and t["channel"] == channel
                            and t["event"] == event, timeout)  # fmt: skip
        return thing.get("data")

    def nothing(self, match: Callable[[dict[str, Any]], bool], seconds: float = 0.5) -> None:
        with pytest.raises(AssertionError, match="nothing matching"):
            self.expect(match, seconds / SCALE)

    @property
    def worker(self) -> str:
        return str(self.socket_id).split(".")[0]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)


@pytest.fixture
def agents(shoal: Shoal, auth: AuthEndpoint) -> Iterator[Callable[..., list[Agent]]]:
    started: list[Agent] = []

    def spread(*users: str, echo: bool = False) -> list[Agent]:
        """One agent per user, the first two on different workers."""
        chosen: list[Agent] = []
        for _ in range(50):
            agent = Agent(shoal, auth, users[len(chosen)], echo=echo)
            started.append(agent)
            if len(chosen) == 1 and agent.worker == chosen[0].worker:
                agent.close()
                continue
            chosen.append(agent)
            if len(chosen) == len(users):
                return chosen
        raise AssertionError("agents never spread over two workers")

    yield spread
    for agent in started:
        agent.close()


def subscribed(channel: str) -> Callable[[dict[str, Any]], bool]:
    return lambda t: t["type"] == "event" and t["channel"] == channel and t["event"] in (
        "pusher:subscription_succeeded", "pusher:subscription_error")  # fmt: skip


def test_pusher_js_channels_presence_and_client_events(
    agents: Callable[..., list[Agent]], library: pusher_library.Pusher
) -> None:
    ann, bo = agents("ann", "bo")
    for agent in (ann, bo):
        for channel in ("news", "private-orders", "presence-lobby"):
            agent.send("subscribe", channel=channel)
            assert agent.expect(subscribed(channel))["event"] == "pusher:subscription_succeeded"

    # Triggered by the server library, with the sender's socket left out, on any worker.
    library.trigger(["news", "private-orders"], "greeting", {"text": "hi"})
    for agent in (ann, bo):
        assert agent.event("news", "greeting") == {"text": "hi"}
        assert agent.event("private-orders", "greeting") == {"text": "hi"}
    library.trigger("news", "greeting", {"text": "not to ann"}, socket_id=ann.socket_id)
    assert bo.event("news", "greeting") == {"text": "not to ann"}
    ann.nothing(lambda t: t.get("event") == "greeting")

    # Presence: both members, seen by pusher-js's own members list.
    ann.send("members", channel="presence-lobby")
    members = ann.expect(lambda t: t["type"] == "members")
    assert members["ids"] == ["ann", "bo"] and members["count"] == 2
    assert members["me"] == {"id": "ann", "info": {"name": "Ann"}}

    # Client events: to the others, never back.
    bo.send("trigger", channel="presence-lobby", event="client-typing", data={"on": True})
    assert bo.expect(lambda t: t["type"] == "triggered")["ok"] is True
    assert ann.event("presence-lobby", "client-typing") == {"on": True}
    bo.nothing(lambda t: t.get("event") == "client-typing")

    bo.close()
    assert ann.event("presence-lobby", "pusher:member_removed")["id"] == "bo"


def test_a_refused_private_channel_reaches_the_clients_error_callback(
    agents: Callable[..., list[Agent]],
) -> None:
    (mallory,) = agents("mallory")
    mallory.send("subscribe", channel="private-vault")
    refused = mallory.expect(subscribed("private-vault"))
    assert refused["event"] == "pusher:subscription_error"
    assert refused["data"]["status"] == 403


@needs_echo_node
def test_laravel_echo_presence_whispers_and_private_events(
    agents: Callable[..., list[Agent]], library: pusher_library.Pusher
) -> None:
    ann, bo = agents("ann", "bo", echo=True)
    ann.send("echo_join", channel="chat.1", event=".message.sent")
    here = ann.expect(lambda t: t["type"] == "here")
    assert here["users"] == [{"name": "Ann"}]
    bo.send("echo_join", channel="chat.1", event=".message.sent")
    assert sorted(u["name"] for u in bo.expect(lambda t: t["type"] == "here")["users"]) == [
        "Ann", "Bo"]  # fmt: skip
    assert ann.expect(lambda t: t["type"] == "joining")["user"] == {"name": "Bo"}

    bo.send("echo_whisper", channel="chat.1", data={"typing": True})
    assert ann.expect(lambda t: t["type"] == "whisper")["data"] == {"typing": True}

    # broadcast(new MessageSent(...))->toOthers(), as Laravel sends it.
    library.trigger("presence-chat.1", "message.sent", {"body": "hello"}, socket_id=bo.socket_id)
    assert ann.expect(lambda t: t["type"] == "echo_event")["data"] == {"body": "hello"}
    bo.nothing(lambda t: t["type"] == "echo_event")

    ann.send("echo_private", channel="orders.7", event=".shipped")
    wait_until(lambda: library.channel_info("private-orders.7")["occupied"], 10, "subscribed")
    library.trigger("private-orders.7", "shipped", {"id": 7})
    assert ann.expect(lambda t: t["type"] == "echo_event")["data"] == {"id": 7}

    bo.close()
    assert ann.expect(lambda t: t["type"] == "leaving")["user"] == {"name": "Bo"}


def test_signed_in_users_get_their_own_events_and_can_be_terminated(
    agents: Callable[..., list[Agent]], library: pusher_library.Pusher
) -> None:
    ann, bo = agents("ann", "bo")
    for agent in (ann, bo):
        agent.send("signin")
        assert agent.expect(lambda t: t["type"] == "signed_in")["user_data"] == {"id": agent.user}
    library.send_to_user("ann", "notice", {"for": "ann"})
    assert ann.expect(lambda t: t["type"] == "user_event" and t["event"] == "notice")["data"] == {
        "for": "ann"}  # fmt: skip
    bo.nothing(lambda t: t["type"] == "user_event" and t["event"] == "notice")

    library.terminate_user_connections("ann")
    ann.expect(lambda t: t["type"] == "state" and t["current"] != "connected")
    bo.nothing(lambda t: t["type"] == "state", seconds=0.5)


def test_cache_channels_replay_the_last_event(
    agents: Callable[..., list[Agent]], library: pusher_library.Pusher
) -> None:
    (ann,) = agents("ann")
    ann.send("subscribe", channel="cache-empty")
    assert ann.event("cache-empty", "pusher:cache_miss") is None
    library.trigger("cache-prices", "price", {"p": 1})
    library.trigger("cache-prices", "price", {"p": 2})
    ann.send("subscribe", channel="cache-prices")
    assert ann.event("cache-prices", "price") == {"p": 2}


def test_pusher_js_reconnects_and_resubscribes_after_a_server_restart(
    shoal: Shoal, agents: Callable[..., list[Agent]], library: pusher_library.Pusher
) -> None:
    (ann,) = agents("ann")
    ann.send("subscribe", channel="presence-ops")
    ann.expect(subscribed("presence-ops"))
    shoal.stop()
    ann.expect(lambda t: t["type"] == "state" and t["current"] != "connected")
    shoal.start()
    ann.expect(lambda t: t["type"] == "connected", timeout=30)
    ann.expect(subscribed("presence-ops"))
    library.trigger("presence-ops", "after", {"ok": True})
    assert ann.event("presence-ops", "after") == {"ok": True}


def test_pusher_js_on_two_nodes_sharing_one_redis(
    nodes: tuple[Shoal, Shoal], auth: AuthEndpoint
) -> None:
    first, second = nodes
    agents: list[Agent] = []
    try:
        ann, bo = Agent(first, auth, "ann"), Agent(second, auth, "bo")
        agents += [ann, bo]
        for agent in (ann, bo):
            agent.send("subscribe", channel="presence-span")
            assert agent.expect(subscribed("presence-span"))["event"].endswith("succeeded")
        bo.send("members", channel="presence-span")
        assert bo.expect(lambda t: t["type"] == "members")["ids"] == ["ann", "bo"]
        assert ann.event("presence-span", "pusher:member_added")["id"] == "bo"

        # Laravel's broadcast()->toOthers() through node a, bo's socket on node b.
        server = pusher_library.Pusher(app_id=APP_ID, key=KEY, secret=SECRET,
                                       host="127.0.0.1", port=first.port, ssl=False)  # fmt: skip
        server.trigger("presence-span", "message.sent", {"n": 1}, socket_id=bo.socket_id)
        assert ann.event("presence-span", "message.sent") == {"n": 1}
        bo.nothing(lambda t: t.get("event") == "message.sent")
        bo.send("trigger", channel="presence-span", event="client-typing", data={"on": 1})
        assert ann.event("presence-span", "client-typing") == {"on": 1}
        bo.close()
        assert ann.event("presence-span", "pusher:member_removed")["id"] == "bo"
    finally:
        for agent in agents:
            agent.close()
