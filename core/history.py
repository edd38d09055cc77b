"""Room history, with no I/O: which rooms keep one, the commands that append to it and
read it back, and whether a client that was away can be caught up.

A room whose name matches a rule of `app.history` keeps its last messages in a Redis
stream. Every message published to it goes through one script that appends it to the
stream and publishes it on the bus, in the same step: history and live delivery agree on
order, across every worker and node, since Redis runs one script at a time.

Each message gets an **offset**, `<n>-0`, where `n` counts the room's messages from 1,
and the room's **epoch**, a random id of the stream's life: when Redis loses the stream
(a restart without persistence, a failover to a replica that had not caught up, or the
history's `ttl` passing with no message), the count starts again under a new epoch. The
offset and epoch are added to the message's JSON (`"offset"`, `"epoch"`), and stored
without them: a replayed message is the same bytes as the live one.

A client that comes back with the last offset and epoch it saw is caught up if the epoch
is the same and the message after its offset is still in the stream (the stream keeps
about `size` messages: it is trimmed from its oldest end, so everything after a message
it holds is there).
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.core.keys import Keys

Command = tuple[Any, ...]

# KEYS: the stream, its meta hash. ARGV: approximate length, ttl (ms), an epoch for a new
# stream, the bus channel, the message's JSON without its closing brace, the connection
# to leave out ("" for none). Appends, publishes the bus envelope (msgpack `[1, 1, true,
# payload, target]`, `shoal.core.envelope.message`) and returns the offset.
APPEND = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local id = redis.call('HINCRBY', KEYS[2], 'n', 1) .. '-0'
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, 'm', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local payload = ARGV[5] .. ',"offset":"' .. id .. '","epoch":"' .. epoch .. '"}'
local target = string.char(0xc0)
if ARGV[6] ~= '' then target = cmsgpack.pack(ARGV[6]) end
-- msgpack bin 32 for the payload (cmsgpack would pack a Lua string as str): bytes.
local bin = string.char(0xc6) .. struct.pack('>I4', #payload) .. payload
redis.call('PUBLISH', ARGV[4], string.char(0x95) .. cmsgpack.pack(1, 1, true) .. bin .. target)
return id
"""

# KEYS: the meta hash. ARGV: an epoch for a new stream, ttl (ms). The room's epoch and
# last offset, the epoch made if there was none (so that a client always has one).
POSITION = """
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('HMGET', KEYS[1], 'epoch', 'n')
"""

_OFFSET = re.compile(r"([1-9][0-9]{0,18})-0")
NO_OFFSET = "0-0"
"""The offset of a room with no message yet: resuming from it replays every message."""


@dataclass(frozen=True, slots=True)
class Rule:
    """Rooms matching `pattern` (shell-style) keep about `size` messages, for `ttl`
    seconds after the last one."""

    pattern: str
    size: int
    ttl: float

    def matches(self, room: str) -> bool:
        return fnmatch.fnmatchcase(room, self.pattern)


class Rules:
    """The `app.history` rules; the first that matches a room applies. Make it in the
    process that uses it: its epochs are unique to it (`epoch()`)."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = tuple(rules)
        self._cache: dict[str, Rule | None] = {}
        # An epoch is given with every append, in case the stream is new: a random part
        # per process and a counter make each unique without a system call per message.
        self._prefix = secrets.token_hex(6)
        self._epochs = itertools.count()

    def epoch(self) -> str:
        """An epoch no other call, in this process or another, returns."""
        return f"{self._prefix}{next(self._epochs):x}"

    def __bool__(self) -> bool:
        return bool(self.rules)

    def of(self, room: str) -> Rule | None:
        """The rule of `room`; None: it keeps no history (nothing changes for it)."""
        try:
            return self._cache[room]
        except KeyError:
            rule = next((r for r in self.rules if r.matches(room)), None)
            if len(self._cache) < 10_000:  # bounded: room names come from clients
                self._cache[room] = rule
            return rule


@dataclass(frozen=True, slots=True)
class Position:
    """Where a room's history stands."""

    epoch: str
    offset: str


@dataclass(frozen=True, slots=True)
class Since:
    """Where a client says it left a room."""

    epoch: str
    offset: str


def since(value: Any) -> Since:
    """Parse a `join_room`'s `since`: `{"offset": "<n>-0", "epoch": "..."}`.

    Raises:
        ValueError: malformed.
    """
    if not isinstance(value, Mapping):
        raise ValueError("since must be an object with offset and epoch")
    offset, epoch = value.get("offset"), value.get("epoch")
    if not isinstance(offset, str) or (offset != NO_OFFSET and not _OFFSET.fullmatch(offset)):
        raise ValueError("since.offset must be an offset a message carried")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        raise ValueError("since.epoch must be the epoch a message carried")
    return Since(epoch, offset)


def number(offset: str) -> int:
    """The count of an offset (`<n>-0`)."""
    return int(offset.partition("-")[0])


APPEND_SHA = hashlib.sha1(APPEND.encode(), usedforsecurity=False).hexdigest()


def append(
    keys: Keys, room: str, rule: Rule, channel: bytes, head: bytes, *, epoch: str, exclude: str
) -> Command:
    """The command that appends a message to a room's history and publishes it, by the
    script's SHA-1: the caller has Redis cache `APPEND` (`Bus.load_script`).

    `head` is the message's JSON without its closing brace (`shoal.core.protocol.encode`
    of a non-empty object, less its last byte); `epoch`, the room's if its history is
    new (`Rules.epoch()`).
    """
    return ("EVALSHA", APPEND_SHA, 2, keys.history(room), keys.history_meta(room), rule.size,
            int(rule.ttl * 1000), epoch, channel, head, exclude)  # fmt: skip


def position(keys: Keys, room: str, rule: Rule, *, epoch: str) -> Command:
    """The command whose reply `parse_position` reads; `epoch` as for `append`."""
    return ("EVAL", POSITION, 1, keys.history_meta(room), epoch, int(rule.ttl * 1000))


def parse_position(reply: Sequence[Any]) -> Position:
    epoch, count = reply
    return Position(str(epoch), f"{count}-0" if count else NO_OFFSET)


def replay(keys: Keys, room: str, after: str) -> Command:
    """The command reading a room's history after `after` (exclusive), oldest first."""
    return ("XRANGE", keys.history(room), f"({after}" if after != NO_OFFSET else "-", "+")


def payloads(entries: Sequence[Any], epoch: str) -> list[tuple[str, bytes]]:
    """(offset, payload) of XRANGE's entries: the bytes the live messages had."""
    found = []
    for entry_id, fields in entries:
        offset = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        stored = dict(zip(fields[::2], fields[1::2], strict=True))
        body = stored.get("m", b"")
        if isinstance(body, str):  # the state connection decodes replies as UTF-8
            body = body.encode()
        found.append((offset, body + f',"offset":"{offset}","epoch":"{epoch}"}}'.encode()))
    return found


def recovered(since: Since, position: Position, first: str | None) -> str | None:
    """Whether a client that left at `since` is caught up by the history after it:
    None when it is, else why not. `first` is the offset of the first message after
    `since` that the stream holds (None: none)."""
    if since.epoch != position.epoch:
        return "epoch changed: the room's history was lost since"
    if number(since.offset) > number(position.offset):
        return "offset unknown: the room has no such message"
    if number(since.offset) == number(position.offset):
        return None  # nothing was said since
    if first is None or number(first) != number(since.offset) + 1:
        return "offset too old: the history kept starts after it"
    return None


_OFFSET_AT_END = re.compile(rb',"offset":"([0-9]+-0)","epoch":"[^"]*"\}$')


def offset_of(payload: bytes) -> int | None:
    """The count of a live message's offset, read from its end; None without one."""
    found = _OFFSET_AT_END.search(payload)
    return number(found.group(1).decode()) if found else None
