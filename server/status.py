"""The master's status file: a JSON snapshot of the node, rewritten about once a second.

It lies next to the pid file (`shoal-9501.pid` -> `shoal-9501.status.json`), so that
whoever can find the master can read its state without talking to it: `shoal status`
prints it, `shoal reload` polls it for the outcome of the reload it asked for. The
master fills a `Snapshot` and calls `write`; readers call `read`.

The JSON object (times are unix times, in seconds):

    {"version": 1, "pid", "node", "started_at", "updated_at",
     "state": "starting" | "running" | "reloading" | "stopping",
     "listen": "ws://host:port/path" or "wss://..." (null for `shoal tasks`),
     "workers": [{"slot", "pid", "generation", "started_at",
                  "state": "starting" | "serving" | "retiring",
                  "connections", "messages"}],
     "housekeeper": {"pid", "started_at"} | null,
     "task_pool": {"pid", "started_at", "processes"} | null,
     "redis": {"address" (never a password), "embedded", "up": true | false | null},
     "reloads", "last_reload": {"at", "ok", "seconds", "reason"} | null}

`version` changes only when a reader of this version would misread the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
from pydantic import TypeAdapter, ValidationError

from shoal.core.errors import StatusUnavailable
from shoal.server.files import write_atomic

VERSION = 1
# The master rewrites the file every second: one this old means its main loop is stuck,
# or it was killed without a chance to remove its pid file.
STALE_AFTER = 5.0

State = Literal["starting", "running", "reloading", "stopping"]
WorkerState = Literal["starting", "serving", "retiring"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Worker:
    """A WebSocket worker; during a reload, old (`retiring`) and new ones are listed."""

    slot: int
    pid: int
    generation: int
    started_at: float
    state: WorkerState
    connections: int
    messages: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Housekeeper:
    pid: int
    started_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPool:
    pid: int
    started_at: float
    processes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Redis:
    """The Redis of the node. `up` is None while the master does not know."""

    address: str
    embedded: bool
    up: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reload:
    """The last reload: when it began (`at`), whether it succeeded, how long it took, and
    why it was aborted when it was."""

    at: float
    ok: bool
    seconds: float
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    version: int = VERSION
    pid: int
    node: str
    started_at: float
    updated_at: float
    state: State
    listen: str | None
    workers: tuple[Worker, ...]
    housekeeper: Housekeeper | None
    task_pool: TaskPool | None
    redis: Redis
    reloads: int = 0
    last_reload: Reload | None = None

    def uptime(self, now: float) -> float:
        """Seconds since the master started, at unix time `now`."""
        return max(0.0, now - self.started_at)

    def stale(self, now: float) -> bool:
        """Whether the master has not rewritten it for `STALE_AFTER` seconds at `now`."""
        return now - self.updated_at > STALE_AFTER


_SNAPSHOT = TypeAdapter(Snapshot)


def path_for(pid_file: Path) -> Path:
    """The status file beside `pid_file`: its `.pid` suffix becomes `.status.json`."""
    name = pid_file.name.removesuffix(".pid")
    return pid_file.with_name(f"{name}.status.json")


def write(path: Path, snapshot: Snapshot) -> None:
    """Replace the status file with `snapshot`, atomically (readers never see half a file).

    Raises:
        OSError: the directory is missing or not writable.
    """
    write_atomic(path, orjson.dumps(snapshot, option=orjson.OPT_APPEND_NEWLINE))


def read(path: Path) -> Snapshot:
    """The snapshot in the status file `path`.

    Raises:
        StatusUnavailable: no such file, not readable, not JSON, another version, or
            not the shape of a snapshot; the message says which.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StatusUnavailable(f"no status file at {path}") from exc
    except OSError as exc:
        raise StatusUnavailable(f"cannot read status file {path}: {exc.strerror}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StatusUnavailable(f"status file {path} is not JSON: {exc}") from exc
    version = data.get("version") if isinstance(data, dict) else None
    if version != VERSION:
        raise StatusUnavailable(
            f"status file {path} is of version {version!r}; this shoal reads version {VERSION}"
        )
    try:
        return _SNAPSHOT.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise StatusUnavailable(
            f"status file {path} is malformed: {where}: {first['msg']}"
        ) from exc
