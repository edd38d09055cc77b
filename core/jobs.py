"""The task queue in Redis, as both sides use it: the commands and the parsing of their
replies, with no I/O. WebSocket workers dispatch jobs and read their outcome; task pools
take jobs, renew their lease on them and finish them.

Layout (see `shoal.core.keys`): the stream `P:tasks` holds one entry per job not yet
finished, read through the consumer group `tasks`; the entry's id is the task id. An
entry is deleted once its job finished, so the stream's length is the number of jobs
pending (queued or running), which `tasks.max_pending` bounds at dispatch, atomically.
The record `P:task:<id>` counts a job's attempts from its first start, then holds its
outcome for `tasks.result_ttl` seconds.

Guarantees:
- A job runs at least once: its entry stays in the group's pending list until it is
  finished, and a job whose consumer stopped renewing its lease (the process died) is
  claimed again after `tasks.visibility_timeout`.
- Its outcome is recorded and delivered exactly once: `finish` sets the outcome only if
  none is set (a script on one key), and only the caller that set it delivers it. A run
  that finds an outcome already recorded (its entry was claimed again after a crash
  between the two steps) acknowledges the entry without running the job.

Every command names one key, like the rest of shoal's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from shoal.core.keys import Keys

GROUP = "tasks"

Command = tuple[Any, ...]
State = Literal["queued", "running", "done", "failed", "unknown"]

# XADD only while fewer than ARGV[1] jobs are pending: one key, atomic. The first job
# creates the stream with its consumer group, so that no stream exists before a job does.
_DISPATCH = (
    "if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end "
    "if redis.call('EXISTS', KEYS[1]) == 0 then "
    "redis.call('XGROUP', 'CREATE', KEYS[1], 'tasks', '0', 'MKSTREAM') end "
    "return redis.call('XADD', KEYS[1], '*', "
    "'name', ARGV[2], 'data', ARGV[3], 'conn', ARGV[4], 'user', ARGV[5])"
)
# The first outcome wins; a later one (a job run twice) is dropped. Returns 1 if set.
_FINISH = (
    "if redis.call('HSETNX', KEYS[1], 'state', ARGV[1]) == 0 then return 0 end "
    "redis.call('HSET', KEYS[1], 'body', ARGV[2], 'name', ARGV[3], 'conn', ARGV[4], "
    "'user', ARGV[5]) redis.call('EXPIRE', KEYS[1], ARGV[6]) return 1"
)


@dataclass(frozen=True, slots=True)
class Job:
    """One job as a task pool reads it from the stream."""

    id: str
    name: str
    data: bytes  # msgpack
    conn: str
    user: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended: its result, or its error `{"type": ..., "message": ...}`."""

    task_id: str
    name: str
    ok: bool
    value: Any

    def client_message(self) -> dict[str, Any]:
        """The message the client that dispatched the job receives."""
        if self.ok:
            return {
                "type": "task_result",
                "task_id": self.task_id,
                "task": self.name,
                "result": self.value,
            }
        return {"type": "task_failed", "task_id": self.task_id, "task": self.name,
                "error": self.value}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Status:
    """Where a job stands; `outcome` once it is done or failed."""

    task_id: str
    state: State
    outcome: Outcome | None = None

    def client_message(self) -> dict[str, Any]:
        """The reply to `task_status`: the outcome's message, or the state."""
        if self.outcome is not None:
            return self.outcome.client_message()
        return {"type": "task_status", "task_id": self.task_id, "state": self.state}


def pack(value: Any) -> bytes:
    """msgpack, as data and results travel.

    Raises:
        TypeError: `value` holds something msgpack cannot carry.
    """
    try:
        return bytes(msgpack.packb(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot be sent as msgpack: {exc}") from exc


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data)


def error(type_: str, message: str) -> dict[str, str]:
    return {"type": type_, "message": message}


# Dispatching and asking


def dispatch(keys: Keys, name: str, data: bytes, *, conn: str, user: str, limit: int) -> Command:
    """Queue a job unless `limit` jobs are pending. The reply is the task id, or None."""
    return ("EVAL", _DISPATCH, 1, keys.tasks, limit, name, data, conn, user)


def status(keys: Keys, task_id: str) -> list[Command]:
    """The commands whose replies `parse_status` reads."""
    return [
        ("HGETALL", keys.task(task_id)),
        ("XRANGE", keys.tasks, task_id, task_id),
    ]


def parse_status(task_id: str, replies: list[Any], user: str | None = None) -> Status:
    """The job's status; with `user`, "unknown" unless that user dispatched it (task
    ids follow the clock: anyone could guess another user's)."""
    record = _pairs(replies[0])
    if user is not None:
        entry = replies[1][0][1] if replies[1] else []
        owner = record.get("user", _pairs(entry).get("user"))
        if owner is None or _text(owner) != user:
            return Status(task_id, "unknown")
    state = _text(record.get("state", ""))
    if state in ("done", "failed"):
        outcome = Outcome(task_id, _text(record.get("name", b"")), state == "done",
                          unpack(record.get("body", b"\xc0")))  # fmt: skip
        return Status(task_id, "done" if outcome.ok else "failed", outcome)
    if replies[1]:
        return Status(task_id, "running" if "attempts" in record else "queued")
    return Status(task_id, "unknown")


# Taking, renewing and finishing


def create_group(keys: Keys) -> Command:
    """The consumer group of an existing stream (BUSYGROUP if it exists; an error if the
    stream does not: no job was dispatched yet, and the first one creates both)."""
    return ("XGROUP", "CREATE", keys.tasks, GROUP, "0")


def read(keys: Keys, consumer: str, count: int, block_ms: int) -> Command:
    """New jobs for `consumer`, waiting up to `block_ms` for one."""
    return ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", keys.tasks, ">")  # fmt: skip


def parse_read(reply: Any) -> list[Job]:
    if not reply:
        return []
    return _jobs(reply[0][1])


def reclaim(keys: Keys, consumer: str, min_idle_ms: int, count: int) -> Command:
    """Jobs whose consumer has not renewed them for `min_idle_ms`, now `consumer`'s."""
    return ("XAUTOCLAIM", keys.tasks, GROUP, consumer, min_idle_ms, "0-0", "COUNT", count)


def parse_reclaim(reply: Any) -> list[Job]:
    return _jobs(reply[1])


def depth(keys: Keys) -> Command:
    """The number of jobs queued or running (finished ones leave the stream)."""
    return ("XLEN", keys.tasks)


def renew(keys: Keys, consumer: str, task_ids: list[str]) -> Command:
    """Reset the idle time of running jobs, so that no one claims them meanwhile.
    (JUSTID: the delivery count is not raised.)"""
    return ("XCLAIM", keys.tasks, GROUP, consumer, 0, *task_ids, "JUSTID")


def hand_back(keys: Keys, consumer: str, task_ids: list[str], idle_ms: int) -> Command:
    """Make running jobs look abandoned (idle for `idle_ms`): the next reclaim of any
    pool takes them at once. For a pool that stops before they finished."""
    return ("XCLAIM", keys.tasks, GROUP, consumer, 0, *task_ids, "IDLE", idle_ms, "JUSTID")


# Leave the group, unless a job is still pending in this consumer's name (deleting the
# consumer would drop it from the pending list, and nobody would run it again).
_LEAVE = (
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
    "local mine = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) "
    "if #mine > 0 then return 0 end "
    "return redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])"
)


def leave(keys: Keys, consumer: str) -> Command:
    """Remove `consumer` from the group if it holds no job (a pool that stops cleanly)."""
    return ("EVAL", _LEAVE, 1, keys.tasks, GROUP, consumer)


def consumers(keys: Keys) -> Command:
    """The group's consumers: the reply `parse_gone` reads."""
    return ("XINFO", "CONSUMERS", keys.tasks, GROUP)


def parse_gone(reply: list[Any], idle_ms: int, keep: str) -> list[str]:
    """Consumers other than `keep`, silent for `idle_ms` and holding no job: what is left
    of pools that died. (A live pool reads at least every second; one removed while it
    idles is listed again at its next read.)"""
    gone = []
    for entry in reply:
        fields = _pairs(entry)
        name = _text(fields.get("name", b""))
        if name != keep and fields.get("pending") == 0 and fields.get("idle", 0) > idle_ms:
            gone.append(name)
    return gone


def start(keys: Keys, task_id: str, ttl: float) -> list[Command]:
    """Count an attempt; the first reply is its number."""
    record = keys.task(task_id)
    return [("HINCRBY", record, "attempts", 1), ("EXPIRE", record, max(1, int(ttl)))]


def finish(keys: Keys, job: Job, outcome: Outcome, ttl: float) -> Command:
    """Record `outcome` unless one is; the reply is 1 if this one was recorded."""
    state = "done" if outcome.ok else "failed"
    return ("EVAL", _FINISH, 1, keys.task(job.id), state, pack(outcome.value), job.name,
            job.conn, job.user, max(1, int(ttl)))  # fmt: skip


def forget(keys: Keys, task_ids: list[str]) -> list[Command]:
    """Take finished jobs off the group's pending list and out of the stream."""
    return [("XACK", keys.tasks, GROUP, *task_ids), ("XDEL", keys.tasks, *task_ids)]


def _jobs(entries: list[Any]) -> list[Job]:
    jobs = []
    for entry in entries:
        if not entry or entry[1] is None:  # deleted meanwhile (Redis 6.2 reports them so)
            continue
        fields = _pairs(entry[1])
        jobs.append(
            Job(
                _text(entry[0]),
                _text(fields.get("name", b"")),
                bytes(fields.get("data", b"\xc0")),
                _text(fields.get("conn", b"")),
                _text(fields.get("user", b"")),
            )
        )
    return jobs


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
