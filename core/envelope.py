"""What travels on the bus: small, typed, versioned msgpack envelopes, with no I/O.

Every envelope is a msgpack array whose first item is the format version and whose
second is its kind:

- `[1, 1, text, payload, target]`, a `Message`: `payload` is the encoded client message
  and `text` says whether it goes out as a text or a binary frame. `target` is the
  connection to leave out (room, channel and global channels, or nil) or the list of
  recipient connections (a worker's own channel).
- `[1, 2, [[user_id, [room, ...]], ...]]`, `Departed`: sent to one worker's channel after
  connections went without their `on_close` completing (their worker or node died, or
  Redis was unreachable when they closed), so that the application can tell their rooms.
- `[1, 3, task_id, name, ok, body, target]`, `TaskDone`: a task's outcome (`body`, msgpack
  of its result or error) for the connections in `target` on one worker's channel; the
  worker also wakes whatever waits for that task there.
- `[1, 4, payload, code, reason, target]`, `Disconnect`: on one worker's channel, the
  connections in `target` get the text message `payload`, then are closed with `code`
  and `reason` (a kick or a ban).

Nodes of different versions may share a Redis during a rolling upgrade: an envelope of
an unknown version or kind raises `EnvelopeError`, which the receiver logs and skips.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgpack

from shoal.core.errors import EnvelopeError

VERSION = 1
_MESSAGE = 1
_DEPARTED = 2
_TASK_DONE = 3
_DISCONNECT = 4


class Message(NamedTuple):
    """A client message for the recipients the channel and `target` select."""

    text: bool
    payload: bytes
    target: str | list[str] | None


@dataclass(frozen=True, slots=True)
class Departed:
    """Users whose connections went without `on_close`, and the rooms they were in."""

    users: list[tuple[str, list[str]]]


@dataclass(frozen=True, slots=True)
class TaskDone:
    """A task's outcome, for the connections in `target` (and waiters of the task)."""

    task_id: str
    name: str
    ok: bool
    body: bytes
    target: list[str]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Send `payload` to the connections in `target`, then close them with `code`."""

    payload: bytes
    code: int
    reason: str
    target: list[str]


def message(payload: bytes, target: str | list[str] | None, *, text: bool = True) -> bytes:
    return msgpack.packb((VERSION, _MESSAGE, text, payload, target))


def departed(users: Iterable[tuple[str, Sequence[str]]]) -> bytes:
    return msgpack.packb((VERSION, _DEPARTED, [[user, list(rooms)] for user, rooms in users]))


def task_done(task_id: str, name: str, ok: bool, body: bytes, target: list[str]) -> bytes:
    return msgpack.packb((VERSION, _TASK_DONE, task_id, name, ok, body, target))


def disconnect(payload: bytes, code: int, reason: str, target: list[str]) -> bytes:
    return msgpack.packb((VERSION, _DISCONNECT, payload, code, reason, target))


def unpack(data: bytes) -> Message | Departed | TaskDone | Disconnect:
    """Decode one envelope.

    Raises:
        EnvelopeError: not an envelope, or one of a version or kind this code does not know.
    """
    try:
        fields = msgpack.unpackb(data)
        version, kind = fields[0], fields[1]
    except (ValueError, TypeError, IndexError, KeyError, msgpack.ExtraData) as exc:
        raise EnvelopeError(f"not a bus envelope: {data[:32]!r}") from exc
    if version != VERSION:
        raise EnvelopeError(f"bus envelope of unknown version {version!r}")
    if kind == _MESSAGE and len(fields) == 5:
        message = Message(*fields[2:])
        if _is_message(message):
            return message
    elif kind == _DEPARTED and len(fields) == 3 and _is_departed(fields[2]):
        return Departed([(user, rooms) for user, rooms in fields[2]])
    elif kind == _TASK_DONE and len(fields) == 7:
        done = TaskDone(*fields[2:])
        if _is_task_done(done):
            return done
    elif kind == _DISCONNECT and len(fields) == 6:
        gone = Disconnect(*fields[2:])
        if _is_disconnect(gone):
            return gone
    elif kind not in (_MESSAGE, _DEPARTED, _TASK_DONE, _DISCONNECT):
        raise EnvelopeError(f"bus envelope of unknown kind {kind!r}")
    # A receiver must never fail on what another process published: check every type.
    raise EnvelopeError(f"malformed bus envelope of kind {kind!r}")


def _is_message(message: Message) -> bool:
    target = message.target
    return (
        type(message.text) is bool
        and type(message.payload) is bytes
        and (
            target is None
            or type(target) is str
            or (type(target) is list and all(type(cid) is str for cid in target))
        )
    )


def _is_departed(users: object) -> bool:
    return type(users) is list and all(
        type(entry) is list
        and len(entry) == 2
        and type(entry[0]) is str
        and type(entry[1]) is list
        and all(type(room) is str for room in entry[1])
        for entry in users
    )


def _is_task_done(done: TaskDone) -> bool:
    return (
        type(done.task_id) is str
        and type(done.name) is str
        and type(done.ok) is bool
        and type(done.body) is bytes
        and type(done.target) is list
        and all(type(cid) is str for cid in done.target)
    )


def _is_disconnect(gone: Disconnect) -> bool:
    return (
        type(gone.payload) is bytes
        and type(gone.code) is int
        and 1000 <= gone.code < 5000
        and type(gone.reason) is str
        and type(gone.target) is list
        and all(type(cid) is str for cid in gone.target)
    )
