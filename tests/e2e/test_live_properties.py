"""Property-based test (hypothesis) of a live two-worker server running the chat app.

Hypothesis writes sequences of random and malformed client messages (valid types with
fields of the wrong type, unknown types, invalid JSON, binary frames, invalid UTF-8,
frames over the size limit, huge names, names with `:*`, NUL and newlines, deep nesting,
big metadata), sent by three plain `websockets` clients spread over both workers. A model
of the chat protocol, written from docs/protocol.md, says what each message must cause.

Properties, for every sequence:
- every message gets exactly the replies and deliveries the model expects (one reply, or
  the documented effect on others, or a documented close of the sender), each matching
  the schema, every error a documented one (never "Internal error");
- no connection other than the sender is ever closed;
- the state in Redis is exactly what the clients did: each connection's hash lists its
  rooms, channels and metadata, room and channel hashes hold exactly their members, and
  after every client closed no connection, room, channel or user key is left;
- the server's log holds no traceback.

One server serves the whole module; each example starts and ends with no client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.core import schema

from support import FAST_REDIS, SCALE, RedisServer, Shoal, clients_on_workers

USERS = ["ann", "b:ob", "c@x.y"]
MAX_MESSAGE_SIZE = 64 * 1024
METADATA_LIMIT = 4096
MAX_DEPTH = 64
NAME_LIMIT = 256
INVALID_FORMAT = "Invalid message format"
TOO_DEEP = f"Message nested too deeply: at most {MAX_DEPTH} levels"
TASK_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
STEP_TIMEOUT = 3.0


# The server


@dataclass
class Server:
    """The node every example talks to, its Redis, and its key prefix."""

    node: Shoal
    redis: RedisServer
    prefix: str


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    prefix = f"p{uuid.uuid4().hex[:10]}"
    settings_ = {
        "server": {"worker_num": 2, "max_message_size": MAX_MESSAGE_SIZE},
        "redis": {"url": redis_server.url, "prefix": prefix, **FAST_REDIS},
        "log": {"level": "info"},
        "tasks": {"task_worker_num": 0},
    }
    node = Shoal(tmp_path_factory.mktemp("live-properties"), settings_).start()
    yield Server(node, redis_server, prefix)
    node.stop()


# What clients send

texts = st.text(st.characters(codec="utf-8"), max_size=30)
present = st.recursive(  # any JSON value but null
    st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
values = st.none() | present
POOL = ["lobby", "a:*", "x\x00y", "two\nlines", "é🐟", "*", "r:x", "user", "n" * NAME_LIMIT]


def deep(levels: int, leaf: Any = 1) -> Any:
    """A value of `levels` levels of arrays and objects (0: `leaf` itself)."""
    value = leaf
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


wrong_names = st.one_of(
    st.sampled_from(["", "x" * (NAME_LIMIT + 1), "y" * 5000]),
    st.none(),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(texts, max_size=2),
    st.dictionaries(texts, texts, max_size=2),
)
names = st.sampled_from(POOL) | st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
any_names = names | names | wrong_names
message_values = (
    values | st.integers(60, 66).map(deep) | st.sampled_from(["z" * 20_000, "\x00", ":*\n"])
)
metadata_values = (
    st.dictionaries(texts, values, max_size=4)
    | st.integers(3900, 4200).map(lambda n: {"blob": "b" * n})
    | st.integers(58, 66).map(lambda levels: {"d": deep(levels)})
    | values
)
task_ids = (
    st.from_regex(r"\d{1,20}-\d{1,20}", fullmatch=True)
    | st.sampled_from(
        [
            "0-0",
            "1732665600000-0",
            "18446744073709551615-18446744073709551615",
            "18446744073709551616-0",
            "99999999999999999999-1",
            "\u0661-\u0661",
        ]
    )
    | texts
    | st.integers()
)
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "broadcast": {"message": message_values},
    "private": {"to": st.sampled_from(USERS) | any_names, "message": message_values},
    "join_room": {"room": any_names},
    "leave_room": {"room": any_names},
    "room_message": {"room": any_names, "message": message_values},
    "subscribe": {"channel": any_names},
    "unsubscribe": {"channel": any_names},
    "publish": {"channel": any_names, "message": message_values},
    "set_metadata": {"metadata": metadata_values},
    "presence": {"room": any_names},
    "task": {"task": texts.filter(lambda n: n not in {"process_data", "broadcast_delayed"})},
    "task_status": {"task_id": task_ids},
    # Moderation is for moderators and admins: without authentication every connection's
    # role is `user`, refused before any field is read.
    "kick_user": {"user_id": st.sampled_from(USERS) | any_names, "reason": values},
    "ban_user": {"user_id": st.sampled_from(USERS) | any_names, "duration": values},
    "unban_user": {"user_id": st.sampled_from(USERS) | any_names},
    "admin_broadcast": {"message": message_values},
    "refresh": {"token": values},
}
MODERATION = {"kick_user", "ban_user", "unban_user", "admin_broadcast"}
assert set(FIELDS) == set(schema.CLIENT_TYPES), "a client type the test does not send"


@st.composite
def client_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A message of a chat type, each field present or not, valid or not, and perhaps a
    field nobody reads; or one of a type the chat app does not know (echoed)."""
    if draw(st.integers(0, 9)) == 0:
        kind = draw(texts.filter(lambda t: t not in schema.CLIENT_TYPES))
        return {"type": kind, **draw(st.dictionaries(texts, values, max_size=3))}
    kind = draw(st.sampled_from(sorted(FIELDS)))
    message: dict[str, Any] = {"type": kind}
    for key, strategy in FIELDS[kind].items():
        if draw(st.integers(0, 5)):
            message[key] = draw(strategy)
    if draw(st.integers(0, 5)) == 0:
        message["extra"] = draw(values)
    return message


ROOMS = st.sampled_from(["lobby", "a:*\x00\né🐟"])
VALID: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "broadcast": {"message": present},
    "private": {"to": st.sampled_from(USERS), "message": st.just("psst")},
    "join_room": {"room": ROOMS},
    "leave_room": {"room": ROOMS},
    "room_message": {"room": ROOMS, "message": present},
    "subscribe": {"channel": ROOMS},
    "unsubscribe": {"channel": ROOMS},
    "publish": {"channel": ROOMS, "message": st.just("news")},
    "set_metadata": {"metadata": st.dictionaries(st.sampled_from("abc"), values, max_size=2)},
    "presence": {"room": ROOMS},
}


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed message of a chat type, on a few shared rooms and channels, so that
    sequences build up state for the malformed ones to meet."""
    kind = draw(st.sampled_from([*sorted(VALID), "join_room", "room_message"]))
    message: dict[str, Any] = {"type": kind}
    for key, strategy in VALID[kind].items():
        if kind != "presence" or draw(st.booleans()):
            message[key] = draw(strategy)
    return message


@dataclass(frozen=True)
class Send:
    """A JSON message (any JSON value), written ASCII-escaped or as raw UTF-8."""

    who: int
    message: Any
    ascii: bool = True


@dataclass(frozen=True)
class Raw:
    """A text frame that is not a valid message, and the error it must get."""

    who: int
    text: str
    error: str


@dataclass(frozen=True)
class Binary:
    who: int
    data: bytes


@dataclass(frozen=True)
class BadUtf8:
    """A text frame that is not UTF-8: RFC 6455 closes the connection with 1007."""

    who: int


@dataclass(frozen=True)
class Leave:
    """The client closes its connection and connects again as the same user."""

    who: int


Action = Send | Raw | Binary | BadUtf8 | Leave


def _deep_text(depth: int, kind: str = "x") -> str:
    """A message of type `kind` nested `depth` levels (written out: the standard
    library's encoder recurses once per level)."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return '{"type":' + json.dumps(kind) + ',"x":' + inner + "}"


RAW = [
    ("", INVALID_FORMAT),
    ("nope", INVALID_FORMAT),
    ("[1]", INVALID_FORMAT),
    ("1", INVALID_FORMAT),
    ('"broadcast"', INVALID_FORMAT),
    ('{"type": 1}', INVALID_FORMAT),
    ("{}", INVALID_FORMAT),
    ('{"type":"broadcast"', INVALID_FORMAT),
    ('{"type":"broadcast","message":NaN}', INVALID_FORMAT),
    ('{"type":"x","n":1e400}', INVALID_FORMAT),
    ('{"type":"x","s":"\\ud800"}', INVALID_FORMAT),
    ('{"type":"x"} {"type":"y"}', INVALID_FORMAT),
    ('{"type":"x","s":"\x01"}', INVALID_FORMAT),  # a raw control character
    (_deep_text(65), TOO_DEEP),
    (_deep_text(300, "set_metadata"), TOO_DEEP),
    (_deep_text(1100, "room_message"), TOO_DEEP),
    ("[" * 3000, TOO_DEEP),
]

# Client 0 sends most, so that its joins and the messages to its rooms meet more often.
WHO = st.sampled_from([0, 0, 1, 2])


@st.composite
def conversations(draw: st.DrawFn) -> list[Action]:
    """A client joins a room and talks in it: the state malformed messages should not
    disturb, and deliveries to the other members."""
    who = draw(WHO)
    room = draw(ROOMS)
    said: list[Action] = [Send(who, {"type": "join_room", "room": room})]
    for _ in range(draw(st.integers(1, 2))):
        said.append(Send(who, {"type": "room_message", "room": room, "message": draw(present)}))
    return said


actions = st.one_of(
    conversations(),
    st.builds(Send, WHO, valid_messages()),
    st.builds(Send, WHO, valid_messages()),
    st.builds(Send, WHO, client_messages(), st.booleans()),
    st.builds(Send, WHO, client_messages()),
    st.builds(Send, WHO, client_messages()),
    st.builds(Send, WHO, values),
    st.builds(Send, WHO, st.just({"type": "big", "x": "x" * MAX_MESSAGE_SIZE})),
    st.sampled_from(RAW).flatmap(lambda raw: st.builds(Raw, WHO, st.just(raw[0]), st.just(raw[1]))),
    st.builds(Binary, WHO, st.binary(max_size=64) | st.just(b"\x00" * 60_000)),
    st.builds(BadUtf8, WHO),
    st.builds(Leave, WHO),
).map(lambda action: action if isinstance(action, list) else [action])
sequences = st.lists(actions, min_size=1, max_size=15).map(
    lambda parts: [action for part in parts for action in part]
)


# The clients and the model of what each one should see


@dataclass
class Peer:
    """One live client, and what the model says its connection holds."""

    user: str
    ws: ClientConnection
    cid: str
    inbox: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    rooms: set[str] = field(default_factory=set)
    channels: set[str] = field(default_factory=set)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def worker(self) -> str:
        return self.cid.rsplit(".", 1)[0]

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                self.inbox.put_nowait(frame)


Expected = dict[int, list[Any]]


class Model:
    """The chat protocol of docs/protocol.md, for clients with one connection per user."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = peers

    def members(self, room: str) -> list[int]:
        return [i for i, p in enumerate(self.peers) if room in p.rooms]

    def subscribers(self, channel: str) -> list[int]:
        return [i for i, p in enumerate(self.peers) if channel in p.channels]

    def send(self, who: int, message: Any) -> Expected:
        """What each client receives after `who` sent `message`; updates the model."""
        sender = self.peers[who]
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return {who: [_error(INVALID_FORMAT)]}
        if _depth(message) > MAX_DEPTH:
            return {who: [_error(TOO_DEEP)]}
        try:
            return self._handle(who, sender, message)
        except Refusal as refused:
            return {who: [_error(str(refused))]}

    def _handle(self, who: int, sender: Peer, m: dict[str, Any]) -> Expected:
        kind = m["type"]
        others = [i for i in range(len(self.peers)) if i != who]
        if kind in MODERATION:
            raise Refusal("Permission denied")
        if kind == "refresh":
            raise Refusal("Authentication is off")
        if kind == "broadcast":
            text = _field(m, "message")
            out = {"type": "broadcast", "from": sender.user, "message": text, "timestamp": "T"}
            return {i: [out] for i in others}
        if kind == "private":
            to = _name(m, "to")
            text = _field(m, "message")
            targets = [i for i, p in enumerate(self.peers) if p.user == to]
            if not targets:
                raise Refusal("User not found")
            expected: Expected = {i: [] for i in {who, *targets}}
            out = {"type": "private_message", "from": sender.user, "message": text}
            for i in targets:
                expected[i].append({**out, "timestamp": "T"})
            expected[who].append({"type": "message_sent", "to": to, "timestamp": "T"})
            return expected
        if kind == "join_room":
            room = _name(m, "room")
            already = room in sender.rooms
            sender.rooms.add(room)
            members = self.members(room)
            users = sorted(self.peers[i].user for i in members if i != who)
            joined = {"type": "joined_room", "room": room, "members": [sender.user, *users],
                      "total_members": len(members)}  # fmt: skip
            expected = {who: [joined]}
            if not already:
                arrived = {"type": "user_joined_room", "user_id": sender.user, "room": room,
                           "total_members": len(members)}  # fmt: skip
                expected.update({i: [arrived] for i in members if i != who})
            return expected
        if kind == "leave_room":
            room = _name(m, "room")
            if room not in sender.rooms:
                raise Refusal("Not in room")
            expected = self.leave(who, room)
            expected[who] = [{"type": "left_room", "room": room}]
            return expected
        if kind == "room_message":
            room = _name(m, "room")
            text = _field(m, "message")
            if room not in sender.rooms:
                raise Refusal("Not in room")
            out = {"type": "room_message", "from": sender.user, "room": room, "message": text,
                   "timestamp": "T"}  # fmt: skip
            return {i: [out] for i in self.members(room)}
        if kind in ("subscribe", "unsubscribe"):
            channel = _name(m, "channel")
            if kind == "subscribe":
                sender.channels.add(channel)
            elif channel in sender.channels:
                sender.channels.discard(channel)
            else:
                raise Refusal("Not subscribed")
            return {who: [{"type": f"{kind}d", "channel": channel}]}
        if kind == "publish":
            channel = _name(m, "channel")
            out = {"type": "message", "channel": channel, "from": sender.user,
                   "message": _field(m, "message"), "timestamp": "T"}  # fmt: skip
            return {i: [out] for i in self.subscribers(channel)}
        if kind == "set_metadata":
            metadata = _field(m, "metadata")
            if not isinstance(metadata, dict):
                raise Refusal("Invalid metadata")
            merged = {**sender.metadata, **metadata}
            if len(orjson.dumps(merged)) > METADATA_LIMIT:
                raise Refusal(f"Metadata too large: at most {METADATA_LIMIT} bytes as JSON")
            sender.metadata = merged
            return {who: [{"type": "metadata_updated", "metadata": merged}]}
        if kind == "presence":
            asked = _name(m, "room") if "room" in m else None
            listed = self.members(asked) if asked is not None else range(len(self.peers))
            entries: list[dict[str, Any]] = [
                {"user_id": p.user, "rooms": sorted(p.rooms), "metadata": p.metadata}
                for p in (self.peers[i] for i in listed)
            ]
            listing = sorted(entries, key=lambda entry: str(entry["user_id"]))
            reply: dict[str, Any] = {"type": "presence", "users": listing}
            if asked is not None:
                reply["room"] = asked
            return {who: [reply]}
        if kind == "task":
            name = _field(m, "task")
            if not isinstance(name, str):
                raise Refusal("Invalid task")
            raise Refusal(f"Unknown task: {name}")
        if kind == "task_status":
            task_id = _field(m, "task_id")
            if not isinstance(task_id, str) or not _task_id(task_id):
                raise Refusal("Invalid task_id")
            return {who: [{"type": "task_status", "task_id": task_id, "state": "unknown"}]}
        return {who: [{"type": "echo", "data": m}]}

    def leave(self, who: int, room: str) -> Expected:
        """`who` leaves `room`: the members left get `user_left_room`."""
        self.peers[who].rooms.discard(room)
        remaining = self.members(room)
        notice = {"type": "user_left_room", "user_id": self.peers[who].user, "room": room,
                  "total_members": len(remaining)}  # fmt: skip
        return {i: [notice] for i in remaining}

    def close(self, who: int) -> Expected:
        """`who`'s connection closed: its rooms are told."""
        expected: Expected = {}
        for room in sorted(self.peers[who].rooms):
            for i, notices in self.leave(who, room).items():
                expected.setdefault(i, []).extend(notices)
        self.peers[who].channels.clear()
        return expected


def _outcome(action: Action, replies: list[Any], closes: int | None) -> str:
    """A label for hypothesis's statistics: what was sent, what its sender got."""
    sent = type(action).__name__
    if isinstance(action, Send) and isinstance(action.message, dict):
        kind = action.message.get("type")
        sent = kind if kind in schema.CLIENT_TYPES else "other type"
    got = sorted(
        str(m["message"]).split(":")[0] if m.get("type") == "error" else m.get("type", "binary")
        for m in replies
    )
    return f"{sent} -> {closes or ', '.join(got) or 'nothing'}"


class Refusal(Exception):
    """The error the sender must get."""


def _error(text: str) -> dict[str, Any]:
    return {"type": "error", "message": text}


def _field(m: dict[str, Any], key: str) -> Any:
    if m.get(key) is None:
        raise Refusal(f"Missing {key}")
    return m[key]


def _name(m: dict[str, Any], key: str) -> str:
    value = _field(m, key)
    if not isinstance(value, str) or not 1 <= len(value) <= NAME_LIMIT:
        raise Refusal(f"Invalid {key}")
    return value


def _task_id(text: str) -> bool:
    match = TASK_ID.fullmatch(text)
    return match is not None and all(int(part) < 2**64 for part in match.groups())


def _depth(value: Any) -> int:
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack += [(c, level + 1) for c in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _normal(frame: str | bytes) -> Any:
    """A received frame in the model's terms: binary as such; JSON checked against the
    schema, its timestamp checked and replaced by "T", members after the joiner sorted."""
    if isinstance(frame, bytes):
        return {"binary": frame.hex()}
    message = json.loads(frame)
    if message.get("type") in schema.SERVER_TYPES:
        schema.check_server_message(message)
    if "timestamp" in message:
        assert type(message["timestamp"]) is int, message
        message["timestamp"] = "T"
    if message.get("type") == "joined_room":
        first, *rest = message["members"]
        message["members"] = [first, *sorted(rest)]
    return message


def _key(item: Any) -> str:
    return json.dumps(item, sort_keys=True)


# Running a sequence


class Run:
    def __init__(self, server: Server, stack: contextlib.AsyncExitStack) -> None:
        self.server = server
        self.stack = stack
        self.redis = server.redis.client()
        self.peers: list[Peer] = []
        self.model = Model(self.peers)
        self.steps = 0

    async def open(self) -> None:
        spread = await self.stack.enter_async_context(clients_on_workers(self.server.node, USERS))
        for c in spread:
            peer = Peer(c.user_id, c.ws, c.connection_id)
            peer.start()
            self.peers.append(peer)

    async def reconnect(self, who: int) -> None:
        old = self.peers[who]
        ws = await self.stack.enter_async_context(
            connect(self.server.node.url(old.user), open_timeout=10 * SCALE, close_timeout=2)
        )
        welcome = json.loads(await asyncio.wait_for(ws.recv(), STEP_TIMEOUT * SCALE))
        assert welcome["type"] == "welcome" and welcome["user_id"] == old.user, welcome
        peer = Peer(old.user, ws, welcome["connection_id"])
        peer.start()
        self.peers[who] = peer
        # Its old connection must leave Redis; until it has, presence may still list it.
        await _until(lambda: not self._traces(old.cid), f"{old.cid} to leave redis")

    def _traces(self, cid: str) -> bool:
        pipe = self.redis.pipeline()
        pipe.exists(self.keys("conn", cid))
        for user in USERS:
            pipe.hexists(self.keys("user", user), cid)
        return any(pipe.execute())

    def keys(self, kind: str, name: str) -> str:
        return f"{self.server.prefix}:{kind}:{name}"

    async def act(self, action: Action) -> None:
        self.steps += 1
        who = action.who
        peer = self.peers[who]
        closes: int | None = None
        expected: Expected = {}
        frame: str | bytes
        if isinstance(action, Send):
            frame = json.dumps(action.message, ensure_ascii=action.ascii)
            if len(frame.encode()) > MAX_MESSAGE_SIZE:
                closes = 1009
            else:
                expected = self.model.send(who, action.message)
        elif isinstance(action, Raw):
            frame = action.text
            expected = {who: [_error(action.error)]}
        elif isinstance(action, Binary):
            frame = action.data
            expected = {who: [{"binary": action.data.hex()}]}
        elif isinstance(action, BadUtf8):
            frame = b'{"type":"x","s":"\xff"}'
            closes = 1007
        else:
            frame = b""
            closes = 1000
        if isinstance(action, Leave):
            await peer.ws.close()
        else:
            await peer.ws.send(frame, text=not isinstance(action, Binary))
        if closes is not None:
            assert peer.reader is not None
            await asyncio.wait_for(peer.reader, STEP_TIMEOUT * SCALE)
            assert peer.ws.close_code == closes, (action, peer.ws.close_code)
            expected = self.model.close(who)
        event(_outcome(action, expected.get(who, []), closes))
        await self.receive(expected, action, closed=who if closes is not None else None)
        if closes is not None:
            await self.reconnect(who)

    async def receive(self, expected: Expected, action: Action, closed: int | None = None) -> None:
        """Each client gets exactly what the model expects (in any order), and no one
        but the sender of a documented close (`closed`) is disconnected."""
        for i, peer in enumerate(self.peers):
            wanted = expected.get(i, [])
            got: list[dict[str, Any]] = []
            for _ in wanted:
                try:
                    frame = await asyncio.wait_for(peer.inbox.get(), STEP_TIMEOUT * SCALE)
                except TimeoutError:
                    raise AssertionError(
                        f"step {self.steps} {action!r}: client {i} got {got}, expected {wanted}"
                    ) from None
                got.append(_normal(frame))
            assert sorted(map(_key, got)) == sorted(map(_key, wanted)), (
                f"step {self.steps} {action!r}: client {i} got {got}, expected {wanted}"
            )
            if i != closed:
                assert peer.reader is not None and not peer.reader.done(), (
                    f"step {self.steps} {action!r}: client {i} was closed "
                    f"({peer.ws.close_code} {peer.ws.close_reason})"
                )

    async def barrier(self) -> None:
        """Each client broadcasts in turn and the others read it: whatever a step sent
        late would come first, and fail the comparison."""
        for who, peer in enumerate(self.peers):
            await peer.ws.send(json.dumps({"type": "broadcast", "message": f"barrier {who}"}))
            out = {"type": "broadcast", "from": peer.user, "message": f"barrier {who}",
                   "timestamp": "T"}  # fmt: skip
            await self.receive(
                {i: [out] for i in range(len(self.peers)) if i != who}, Send(who, "barrier")
            )
        for i, peer in enumerate(self.peers):
            assert peer.inbox.empty(), f"client {i} got more: {peer.inbox.get_nowait()!r}"

    def state(self) -> dict[str, dict[str, str]]:
        """Every hash under the prefix but the workers' own registration."""
        prefix = self.server.prefix
        found: dict[str, dict[str, str]] = {}
        for key in self.redis.scan_iter(match=f"{prefix}:*", count=1000):
            kind = key[len(prefix) + 1 :].split(":", 1)[0]
            if kind in ("workers", "alive"):
                continue
            held: Any = self.redis.hgetall(key)  # decoded: str keys and values
            found[key] = held
        return found

    def expected_state(self) -> dict[str, dict[str, str]]:
        state: dict[str, dict[str, str]] = {}
        for p in self.peers:
            record = {"user": p.user, "worker": p.worker}
            record |= {f"r:{room}": "1" for room in p.rooms}
            record |= {f"c:{channel}": "1" for channel in p.channels}
            state[self.keys("conn", p.cid)] = record
            for kind, topics in (("room", p.rooms), ("chan", p.channels)):
                for topic in topics:
                    state.setdefault(self.keys(kind, topic), {})[p.cid] = p.user
                    state.setdefault(self.keys(f"{kind}users", topic), {})[p.user] = "1"
            state[self.keys("user", p.user)] = {p.cid: p.worker}
            state.setdefault(self.keys("wconns", p.worker), {})[p.cid] = p.user
            state.setdefault(f"{self.server.prefix}:users", {})[p.user] = "1"
        return state

    def difference(self) -> str:
        """How Redis differs from the model's state ("" if it does not). Connection hashes
        are compared on the fields the model knows, `meta` as JSON, and must have the
        fields every connection has."""
        state = self.state()
        for p in self.peers:
            record = state.get(self.keys("conn", p.cid))
            if record is None:
                continue
            meta = json.loads(record.pop("meta", "{}"))
            if meta != p.metadata:
                return f"{p.cid}: metadata {meta!r}, expected {p.metadata!r}"
            for known in ("node", "addr", "at"):
                if record.pop(known, None) is None:
                    return f"{p.cid}: no {known}"
        expected = self.expected_state()
        wrong = [
            f"{key!r}: {state.get(key)!r}, expected {expected.get(key)!r}"
            for key in sorted(state.keys() | expected.keys())
            if state.get(key) != expected.get(key)
        ]
        return "; ".join(wrong)


async def _until(predicate: Callable[[], Any], what: str, timeout: float = STEP_TIMEOUT) -> None:
    """Poll `predicate` until it holds; else fail naming `what`."""
    deadline = time.monotonic() + timeout * SCALE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _settled(describe: Callable[[], str], what: str) -> None:
    """Poll until `describe` finds no difference; else fail with the last one it found."""
    deadline = time.monotonic() + STEP_TIMEOUT * SCALE
    while difference := describe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {difference}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[Run]:
    async with contextlib.AsyncExitStack() as stack:
        run = Run(server, stack)
        try:
            yield run
        finally:
            for peer in run.peers:
                if peer.reader is not None:
                    peer.reader.cancel()


async def play(server: Server, sequence: list[Action]) -> int:
    """Run one sequence; return the number of steps."""
    async with running(server) as run:
        await run.open()
        for action in sequence:
            await run.act(action)
        await run.barrier()
        await _settled(run.difference, "redis does not hold what the clients did")
    await _settled(lambda: ", ".join(map(repr, run.state())), "keys left after every client closed")
    return run.steps


# The properties

EXAMPLES = 100
TOTALS = {"sequences": 0, "steps": 0, "seconds": 0.0}


@given(sequences)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_random_and_malformed_messages_from_several_clients(
    server: Server, sequence: list[Action]
) -> None:
    started = time.monotonic()
    TOTALS["steps"] += asyncio.run(play(server, sequence))
    TOTALS["sequences"] += 1
    TOTALS["seconds"] += time.monotonic() - started
    assert not _log_problems(server.node.log())


def _log_problems(log: str) -> list[str]:
    """Tracebacks and lines logged at ERROR or above: malformed input deserves neither."""
    return [line for line in log.splitlines() if re.search(r"Traceback| ERROR | CRITICAL ", line)]


async def test_task_ids_redis_would_refuse_are_invalid(server: Server) -> None:
    """Regression: ids of the right shape that are not stream ids (a part of 2⁶⁴ or
    more, digits of another script) reached Redis, which refused them, and the client
    read "Service unavailable"."""
    async with clients_on_workers(server.node, ["ann"], workers=1) as (ann,):
        for task_id in ("18446744073709551616-0", "0-99999999999999999999", "\u0661-\u0661"):
            error = await ann.request({"type": "task_status", "task_id": task_id}, "error")
            assert error["message"] == "Invalid task_id", task_id
        for task_id in ("18446744073709551615-18446744073709551615", "0-0", "007-1"):
            status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")
            assert status == {"type": "task_status", "task_id": task_id, "state": "unknown"}


def test_figures(server: Server, record_property: Any) -> None:
    """What the sequences above sent, and what the log grew by (runs after them)."""
    log = server.node.log()
    assert not _log_problems(log)
    record_property("sequences", TOTALS["sequences"])
    record_property("messages", TOTALS["steps"])
    record_property("seconds", round(TOTALS["seconds"], 1))
    record_property("log_bytes", len(log))
