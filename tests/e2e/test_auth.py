"""Identity at the handshake, roles and moderation, against a live two-worker server with
plain `websockets` clients and tokens signed here with PyJWT."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import (
    FAST_REDIS,
    Client,
    RedisServer,
    Shoal,
    eventually,
    pipelined_hello,
    scrape,
    wait_until,
)

SECRET = "a-test-secret-long-enough-for-hs512-too-0123456789abcdefghijklmnop"
OTHER_SECRET = "another-secret-long-enough-for-hs512-too-0123456789abcdefghijklmn"


def token(
    sub: str,
    role: str | None = None,
    *,
    ttl: float = 300,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    if role is not None:
        body["role"] = role
    return jwt.encode(body, secret, algorithm=algorithm)


def settings_for(redis_server: RedisServer, **auth: Any) -> dict[str, Any]:
    return {
        "server": {"worker_num": 2},
        "redis": {"url": redis_server.url, "prefix": f"t{uuid.uuid4().hex[:10]}", **FAST_REDIS},
        "log": {"level": "info"},
        "tasks": {"task_worker_num": 0},
        "auth": {"jwt": {"secret": SECRET}, **auth},
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Shoal]:
    settings = settings_for(
        redis_server, rooms=[{"pattern": "staff.*", "roles": ["moderator", "admin"]}]
    )
    shoal = Shoal(tmp_path_factory.mktemp("auth"), settings).start()
    yield shoal
    shoal.stop()


def url(node: Shoal, query: str = "") -> str:
    return f"ws://127.0.0.1:{node.port}/ws{query}"


@contextlib.asynccontextmanager
async def user(
    node: Shoal, sub: str, role: str | None = None, *, ttl: float = 300
) -> AsyncIterator[Client]:
    async with connect(url(node, f"?token={token(sub, role, ttl=ttl)}"), close_timeout=2) as ws:
        c = Client(ws)
        c.welcome = await c.expect("authenticated")
        yield c


async def refused(target: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a refused handshake."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(target, **kwargs):
            pass
    response = caught.value.response
    return response.status_code, json.loads(response.body)


async def test_a_valid_token_names_the_user_and_role(node: Shoal) -> None:
    """The first frame is `authenticated`, with the token's `sub` and `role`; a
    `user_id` query parameter cannot override the token."""
    query = f"?user_id=mallory&token={token('ann', 'moderator')}"
    async with connect(url(node, query)) as ws:
        c = Client(ws)
        first = await c.expect("authenticated")
    assert (first["user_id"], first["role"]) == ("ann", "moderator")
    async with user(node, "bo") as bo:  # no role claim: `user`
        assert bo.welcome["role"] == "user"


async def test_the_token_may_come_in_a_header_or_a_subprotocol(node: Shoal) -> None:
    headers = {"Authorization": f"Bearer {token('hdr')}"}
    async with connect(url(node), additional_headers=headers) as ws:
        assert (await Client(ws).expect("authenticated"))["user_id"] == "hdr"
    # Browsers cannot set headers: the token rides in Sec-WebSocket-Protocol, beside `shoal`,
    # which the server selects (a browser fails a connection whose offer was not taken).
    offers: Any = ["shoal", f"bearer.{token('sub')}"]
    async with connect(url(node), subprotocols=offers) as ws:
        assert ws.subprotocol == "shoal"
        assert (await Client(ws).expect("authenticated"))["user_id"] == "sub"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: None, "missing token"),
        (lambda: token("ann", ttl=-30), "token expired"),
        (lambda: token("ann", secret=OTHER_SECRET), "invalid signature"),
        (lambda: token("ann", algorithm="HS512"), "algorithm not allowed"),
        (
            lambda: jwt.encode({"sub": "ann", "exp": time.time() + 60}, "", "none"),
            "algorithm not allowed",
        ),
        (lambda: jwt.encode({"sub": "ann"}, SECRET, "HS256"), "token lacks the exp claim"),
        (lambda: token("bad id!"), "invalid sub claim: 1-128 word characters or .@:+-"),
        (lambda: "not.a.token", "malformed token"),
    ],
    ids=[
        "missing",
        "expired",
        "signature",
        "algorithm",
        "alg-none",
        "no-exp",
        "bad-sub",
        "garbage",
    ],
)
async def test_bad_tokens_are_refused_at_the_handshake(node: Shoal, make: Any, reason: str) -> None:
    """401 with a short JSON reason, before any WebSocket frame."""
    value = make()
    query = "" if value is None else f"?token={value}"
    status, body = await refused(url(node, query))
    assert (status, body) == (401, {"error": "unauthorized", "reason": reason})


async def test_a_role_may_send_only_what_it_is_allowed(node: Shoal) -> None:
    """A user cannot kick, ban or broadcast as an admin: `Permission denied`, and the
    target stays connected."""
    async with user(node, "victim") as victim, user(node, "plain") as plain:
        for message in (
            {"type": "kick_user", "user_id": "victim"},
            {"type": "ban_user", "user_id": "victim", "duration": 60},
            {"type": "unban_user", "user_id": "victim"},
            {"type": "admin_broadcast", "message": "hi"},
        ):
            assert (await plain.request(message, "error"))["message"] == "Permission denied"
        await victim.silent()
        assert (await victim.request({"type": "ping"}, "echo"))["data"] == {"type": "ping"}


async def test_a_moderator_kicks_a_user_on_another_worker(node: Shoal) -> None:
    async with contextlib.AsyncExitStack() as stack:
        mod = await stack.enter_async_context(user(node, "mod", "moderator"))
        # Open connections of the target until one is on another worker than the moderator.
        targets: list[Client] = []
        for _ in range(40):
            targets.append(await stack.enter_async_context(user(node, "target")))
            if targets[-1].worker != mod.worker:
                break
        assert any(t.worker != mod.worker for t in targets)
        reply = await mod.request(
            {"type": "kick_user", "user_id": "target", "reason": "spam"}, "user_kicked"
        )
        assert reply["connections"] == len(targets)
        for target in targets:
            kicked = await target.expect("kicked")
            assert (kicked["by"], kicked["reason"]) == ("mod", "spam")
            with pytest.raises(ConnectionClosed):
                await target.recv()
            assert target.ws.close_code == 4003
        missing = await mod.request({"type": "kick_user", "user_id": "nobody"}, "error")
        assert missing["message"] == "User not found"


async def test_a_ban_refuses_the_user_until_it_expires_or_is_lifted(node: Shoal) -> None:
    async with user(node, "boss", "admin") as boss:
        async with user(node, "troll") as troll:
            reply = await boss.request(
                {"type": "ban_user", "user_id": "troll", "duration": 2, "reason": "abuse"},
                "user_banned",
            )
            assert reply["connections"] == 1
            banned = await troll.expect("banned")
            assert (banned["by"], banned["reason"], banned["until"]) == (
                "boss", "abuse", reply["until"]
            )  # fmt: skip
            with pytest.raises(ConnectionClosed):
                await troll.recv()
            assert troll.ws.close_code == 4004
        status, body = await refused(url(node, f"?token={token('troll')}"))
        assert (status, body["reason"], body["until"]) == (403, "banned", reply["until"])

        async def admitted() -> bool:
            with contextlib.suppress(InvalidStatus):
                async with user(node, "troll"):
                    return True
            return False

        started = time.monotonic()
        await eventually(admitted, 6, "the ban to expire")
        assert time.monotonic() - started >= 0.5  # it held for the rest of its 2 s
        # Lifted early by unban_user.
        await boss.request({"type": "ban_user", "user_id": "troll", "duration": 600},
                           "user_banned")  # fmt: skip
        assert (await refused(url(node, f"?token={token('troll')}")))[0] == 403
        lifted = await boss.request({"type": "unban_user", "user_id": "troll"}, "user_unbanned")
        assert lifted["was_banned"] is True
        async with user(node, "troll"):
            pass


async def test_admin_broadcast_reaches_everyone(node: Shoal) -> None:
    async with contextlib.AsyncExitStack() as stack:
        boss = await stack.enter_async_context(user(node, "chief", "admin"))
        others = [await stack.enter_async_context(user(node, f"u{n}")) for n in range(6)]
        assert len({c.worker for c in [boss, *others]}) == 2
        await boss.send({"type": "admin_broadcast", "message": "maintenance at 5"})
        for c in [boss, *others]:
            got = await c.expect("admin_broadcast")
            assert got["message"] == "maintenance at 5"


async def test_restricted_rooms_and_presence_of_everyone(node: Shoal) -> None:
    """`auth.rooms` keeps `staff.*` to moderators and admins; `presence` of the whole
    deployment is an admin's."""
    async with user(node, "pleb") as pleb, user(node, "modo", "moderator") as modo:
        for message in (
            {"type": "join_room", "room": "staff.lounge"},
            {"type": "presence", "room": "staff.lounge"},
            {"type": "presence"},
        ):
            assert (await pleb.request(message, "error"))["message"] == "Permission denied"
        await pleb.request({"type": "join_room", "room": "lobby"}, "joined_room")
        await modo.request({"type": "join_room", "room": "staff.lounge"}, "joined_room")
        listed = await modo.request({"type": "presence", "room": "staff.lounge"}, "presence")
        assert [entry["user_id"] for entry in listed["users"]] == ["modo"]
        async with user(node, "root", "admin") as root:
            everyone = await root.request({"type": "presence"}, "presence")
            assert {"pleb", "modo", "root"} <= {entry["user_id"] for entry in everyone["users"]}


async def test_an_expired_token_closes_the_connection_unless_refreshed(node: Shoal) -> None:
    async with user(node, "short", ttl=2) as short, user(node, "renewed", ttl=2) as renewed:
        reply = await renewed.request({"type": "refresh", "token": token("renewed")}, "refreshed")
        assert reply["expires_at"] > time.time() + 200
        other = await renewed.request({"type": "refresh", "token": token("someone")}, "error")
        assert other["message"] == "Token is for another user"
        bad = await renewed.request({"type": "refresh", "token": "x.y.z"}, "error")
        assert bad["message"] == "Invalid token: malformed token"
        with pytest.raises(ConnectionClosed):
            await short.recv(timeout=6)
        assert (short.ws.close_code, short.ws.close_reason) == (4002, "token expired")
        assert (await renewed.request({"type": "still"}, "echo"))["data"] == {"type": "still"}


async def test_tokens_and_secrets_never_reach_the_log(node: Shoal) -> None:
    secret_token = token("logged")
    async with connect(url(node, f"?token={secret_token}")) as ws:
        await Client(ws).expect("authenticated")
    log = node.log()
    assert "connection opened" in log
    assert secret_token not in log
    assert SECRET not in log


async def test_optional_tokens_leave_anonymous_guests(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """With `auth.required: false`, a client without a token is an anonymous guest with a
    server-chosen id (never one it names); a bad token is still refused."""
    shoal = Shoal(tmp_path, settings_for(redis_server, required=False)).start()
    try:
        async with connect(url(shoal, "?user_id=admin")) as ws:
            first = await Client(ws).expect("welcome")
        assert first["user_id"].startswith("u-")
        assert (await refused(url(shoal, "?token=bad.token.here")))[0] == 401
        async with connect(url(shoal, f"?token={token('real')}")) as ws:
            assert (await Client(ws).expect("authenticated"))["user_id"] == "real"
    finally:
        shoal.stop()


async def test_configured_roles_override_the_defaults(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`auth.roles` lists exactly what a role may send: here a `reader` may join rooms
    and nothing else, and `user` keeps everything but broadcast."""
    roles = {"reader": ["join_room"], "user": ["*"]}
    settings = settings_for(redis_server, roles=roles)
    shoal = Shoal(tmp_path, settings).start()
    try:
        async with user(shoal, "r", "reader") as reader, user(shoal, "u") as plain:
            await reader.request({"type": "join_room", "room": "x"}, "joined_room")
            denied = await reader.request({"type": "room_message", "room": "x", "message": 1},
                                          "error")  # fmt: skip
            assert denied["message"] == "Permission denied"
            # `*` is every type whose handler declares no roles: not kick_user.
            assert (await plain.request({"type": "kick_user", "user_id": "r"}, "error"))[
                "message"
            ] == "Permission denied"
            await plain.request({"type": "join_room", "room": "x"}, "joined_room")
            await reader.expect("user_joined_room")
    finally:
        shoal.stop()


async def test_refusals_are_counted(node: Shoal) -> None:
    key = ("shoal_handshakes_refused_total", "unauthorized")
    before = scrape(node).get(key, 0)
    await refused(url(node))
    # Each process copies its counts to shared memory once a second.
    wait_until(lambda: scrape(node)[key] > before, 3, "the refusal counted")


def test_frames_pipelined_with_a_deferred_handshake_are_handled(node: Shoal) -> None:
    """With authentication on, the handshake waits for the ban check in Redis; frames the
    client sent in the same packet as its request are held, then handled in order after
    the 101, as without authentication."""
    data = pipelined_hello(node.port, f"/ws?token={token('pip')}")
    assert data.startswith(b"HTTP/1.1 101")
    assert b'"authenticated"' in data and b'{"type":"echo","data":{"type":"hello"}}' in data
    assert data.index(b'"authenticated"') < data.index(b'"echo"')


async def test_redis_down_during_the_ban_check_answers_503(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """The ban list cannot be read: the handshake is refused with 503 and Retry-After (the
    client retries), never let through unchecked and never left hanging."""
    settings = settings_for(own_redis)
    shoal = Shoal(tmp_path, settings).start()
    try:
        own_redis.freeze()
        try:
            started = time.monotonic()
            status, body = await refused(url(shoal, f"?token={token('ann')}"), open_timeout=15)
            assert (status, body["error"]) == (503, "unavailable")
            assert time.monotonic() - started < 10  # bounded by redis.stall_timeout & co
        finally:
            own_redis.thaw()

        async def admitted() -> bool:
            with contextlib.suppress(InvalidStatus):  # 503 until the worker sees Redis back
                async with user(shoal, "ann"):
                    return True
            return False

        await eventually(admitted, 10, "the handshake accepted once Redis is back")
    finally:
        shoal.stop()
