"""The application API: what users write to build their own server on shoal.

An application is an `App` object with handlers, the way a Swoole server has `on('open')`,
`on('message')` and `on('close')`::

    from shoal.core.app import App, Connection

    app = App()

    @app.on_open
    async def hello(conn: Connection) -> None:
        await conn.send({"type": "hello", "user_id": conn.user_id})

    @app.on("shout")
    async def shout(conn: Connection, message: dict[str, Any]) -> None:
        await conn.hub.broadcast({"type": "shout", "text": message.get("text")})

Handlers raise `ProtocolError("...")` to answer `{"type": "error", "message": "..."}`;
any other exception is logged and answered with an "Internal error" frame, and the
connection stays open. Load an application with `app.module: "package.module:app"`.

`Connection` and `Hub` are the interfaces handlers receive. They are protocols, so this
module carries no process role: the WebSocket worker implements them, and code that only
builds or checks applications (the CLI, tests, a task worker) never loads the worker.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from shoal.core.auth import Identity, PermissionDenied, Policy
from shoal.core.errors import BootError, ConfigError
from shoal.core.history import Since
from shoal.core.jobs import Outcome, Status
from shoal.core.keys import TopicKind
from shoal.core.registry import Members
from shoal.core.schema import CloseCode, PresenceEntry

__all__ = [
    "App",
    "Connection",
    "Hub",
    "Identity",
    "Members",
    "Outcome",
    "PermissionDenied",
    "Policy",
    "Status",
    "Tasks",
    "TopicKind",
    "check",
    "load",
    "resolve",
]


class Tasks(Protocol):
    """Waiting on tasks a connection dispatched (`Connection.dispatch`), from any worker."""

    async def wait(self, task_id: str) -> Any:
        """The job's result (Swoole's `taskwait`); bound the wait with `asyncio.timeout()`.

        Raises:
            TaskFailed: the job failed; its `type` and `message` say how.
        """

    async def wait_many(
        self,
        task_ids: Iterable[str],
        timeout: float,  # noqa: ASYNC109 - what ends within a deadline, not a cancellation
    ) -> dict[str, Any]:
        """Results of the jobs that end within `timeout` (Swoole's `taskWaitMulti`): each
        result, or the `TaskFailed` of a job that failed; unfinished ones are left out."""

    async def status(self, task_id: str, *, user: str | None = None) -> Status:
        """Where a job stands: queued, running, done or failed (with its outcome), or
        unknown (never dispatched, or its outcome expired after `tasks.result_ttl`).
        With `user`, a job another user dispatched is unknown too: task ids follow the
        clock, so a client asking for an id must not read someone else's result."""


class Hub(Protocol):
    """Cluster-wide operations of the worker a connection lives on."""

    async def broadcast(
        self, message: Mapping[str, Any], *, exclude: Connection | None = None
    ) -> None:
        """Send `message` to every connection of the deployment, but `exclude`."""

    async def publish(
        self,
        room: str,
        message: Mapping[str, Any],
        *,
        exclude: Connection | None = None,
        kind: TopicKind = TopicKind.ROOM,
    ) -> None:
        """Send `message` to every member of a room (or channel), on every worker and node."""

    async def send_to_user(self, user_id: str, message: Mapping[str, Any]) -> int:
        """Send `message` to every connection of `user_id`. Returns how many it has (0: none)."""

    async def room_members(self, room: str, limit: int | None = None) -> Members:
        """Up to `limit` of the distinct user ids in a room (all with None), across
        workers and nodes, and their number (`.total`)."""

    async def presence(self, room: str | None = None) -> list[PresenceEntry]:
        """Who is connected, across workers and nodes: the whole server, or one room."""

    async def total_users(self) -> int:
        """How many distinct users are connected, across workers and nodes."""

    async def user_connections(self, user_id: str) -> int:
        """How many connections `user_id` has open, across workers and nodes."""

    async def disconnect_user(
        self, user_id: str, message: Mapping[str, Any], code: int, reason: str
    ) -> int:
        """Send `message` to every connection of `user_id`, on any worker or node, then
        close each with `code` and `reason` (a kick). Returns how many it had."""

    async def ban(self, user_id: str, seconds: int, record: dict[str, Any]) -> None:
        """Refuse `user_id`'s handshakes with 403 for `seconds`, across the deployment
        (`record` is kept with the ban). It does not close open connections: kick them."""

    async def unban(self, user_id: str) -> bool:
        """Lift `user_id`'s ban. Returns whether there was one."""

    @property
    def policy(self) -> Policy:
        """What each role may do (`auth.*`): ask it before acting for a client."""

    @property
    def tasks(self) -> Tasks:
        """The task queue: wait on jobs, ask where they stand."""


class Connection(Protocol):
    """A client connected to this worker.

    Attributes:
        id: unique across the whole deployment (`<worker id>.<n>`).
        user_id: the user; several connections may share one.
        address: the client's address, `host:port`.
        connected_at: when it connected, in epoch milliseconds.
        metadata: what `set_metadata()` merged in; visible in presence.
        rooms, channels: names this connection is in.
        hub: the worker's hub, for cluster-wide operations.
        request_path: the path and query of the opening handshake (a `token`
            parameter's value reads `***`).
        identity: who the client is (user id, role, the token's claims), decided at
            the handshake.
    """

    id: str
    user_id: str
    identity: Identity
    address: str
    connected_at: int
    metadata: dict[str, Any]
    rooms: set[str]
    channels: set[str]
    request_path: str

    @property
    def hub(self) -> Hub: ...

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one JSON message to this client."""

    async def send_text(self, text: str) -> None:
        """Send one text frame."""

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame."""

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection; `on_close` then runs as for any close."""

    async def join(
        self, room: str, *, limit: int | None = None, since: Since | None = None
    ) -> Members:
        """Join a room. Returns up to `limit` of its members' distinct user ids (all with
        None; this one's included) and their number (`.total`). A big room's member list
        is a sample: ask for a `limit` wherever the room may be large.

        In a room with a history (`app.history`), `.position` is where it stands (epoch
        and last offset); with `since`, where the client left it, what the room said
        after that is sent to the client first, and `.recovered` says whether that
        caught it up (`.reason` says why not: then nothing is replayed).

        Raises:
            PermissionDenied: `auth.rooms` keeps the room from this connection's role.
        """

    async def leave(self, room: str, *, limit: int | None = None) -> Members:
        """Leave a room. Returns up to `limit` of the remaining members' distinct user
        ids (all with None), and their number (`.total`).

        Raises:
            ProtocolError: "Not in room".
        """

    async def subscribe(self, channel: str) -> None:
        """Receive what is published on `channel`."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel`.

        Raises:
            ProtocolError: "Not subscribed".
        """

    async def set_metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `metadata` into this connection's metadata. Returns the result."""

    async def dispatch(self, task: str, data: Any = None) -> str:
        """Hand a slow job to the task pool (Swoole's `task()`); returns its task id at
        once. Its outcome comes back to this connection (or, if it closed, to its user's
        other connections) through `on_task_result`, or as a `task_result` /
        `task_failed` message when the application has none.

        Raises:
            TaskRefused: the task is unknown, `data` cannot travel as msgpack, or the
                queue is full (`tasks.max_pending`).
        """


OpenHandler = Callable[[Connection], Awaitable[None]]
MessageHandler = Callable[[Connection, dict[str, Any]], Awaitable[None]]
FrameHandler = Callable[[Connection, str | bytes], Awaitable[None]]
BinaryHandler = Callable[[Connection, bytes], Awaitable[None]]
DepartedHandler = Callable[[Hub, str, list[str]], Awaitable[None]]
TaskResultHandler = Callable[[Connection, Outcome], Awaitable[None]]
_F = TypeVar("_F", bound=Callable[..., Awaitable[None]])

BUILTIN = {
    "chat": "shoal.workers.apps.chat:app",
    "echo": "shoal.workers.apps.echo:app",
}


class App:
    """Handlers for one application. Register them with the decorators below.

    Attributes:
        settings: the `app` section of the configuration, less `module`; set by the
            worker before the first connection.
    """

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.open_handler: OpenHandler | None = None
        self.close_handler: OpenHandler | None = None
        self.handlers: dict[str, MessageHandler] = {}
        self.default_handler: MessageHandler | None = None
        self.binary_handler: BinaryHandler | None = None
        self.frame_handler: FrameHandler | None = None
        self.departed_handler: DepartedHandler | None = None
        self.task_result_handler: TaskResultHandler | None = None
        self.settings_check: Callable[[dict[str, Any]], None] | None = None
        self.roles: dict[str, tuple[str, ...]] = {}
        """Message type -> the roles its handler allows (`on(..., roles=...)`)."""

    def on_open(self, handler: OpenHandler) -> OpenHandler:
        """Run after a client connected and its state is in Redis."""
        self.open_handler = handler
        return handler

    def on_close(self, handler: OpenHandler) -> OpenHandler:
        """Run when a client is gone, whatever the cause, before its state is removed.

        Rooms and channels the handler does not leave are left afterwards, silently.
        If Redis is unreachable while it runs (it raises `ServiceUnavailable`), the
        connection is announced later through `on_departed`, once Redis is back.
        """
        self.close_handler = handler
        return handler

    def on_departed(self, handler: DepartedHandler) -> DepartedHandler:
        """Run as `handler(hub, user_id, rooms)` for each connection that went without its
        `on_close` completing: its worker or node died, or Redis was unreachable when it
        closed. Its state is already gone.

        It runs on one live worker of the node that cleaned up, so that the application
        can tell the rooms, as `on_close` does for an ordinary close.
        """
        self.departed_handler = handler
        return handler

    def on_task_result(self, handler: TaskResultHandler) -> TaskResultHandler:
        """Run as `handler(conn, outcome)` when a task `conn` dispatched (or another
        connection of its user, since closed) ended (Swoole's `onFinish`). Without it,
        the client gets `outcome.client_message()`."""
        self.task_result_handler = handler
        return handler

    def check_settings(
        self, check: Callable[[dict[str, Any]], None]
    ) -> Callable[[dict[str, Any]], None]:
        """Validate the application's settings when a worker loads it.

        `check(settings)` raises `ConfigError` naming the key (`app.<key>: ...`); the
        worker then cannot start, and the node stops with that message.
        """
        self.settings_check = check
        return check

    def on(self, message_type: str, *, roles: Iterable[str] | None = None) -> Callable[[_F], _F]:
        """Handle JSON text messages whose `type` is `message_type`.

        With `roles`, only connections of those roles may send it; others get
        `{"type": "error", "message": "Permission denied"}` and the handler does not run.
        `auth.roles` in the configuration overrides this per role.
        """

        def register(handler: _F) -> _F:
            self.handlers[message_type] = handler
            if roles is not None:
                self.roles[message_type] = tuple(roles)
            return handler

        return register

    def on_unknown(self, handler: MessageHandler) -> MessageHandler:
        """Handle JSON messages of a type no `on()` handler claims.

        Without it, such messages are answered with an "Unknown message type" error.
        """
        self.default_handler = handler
        return handler

    def on_binary(self, handler: BinaryHandler) -> BinaryHandler:
        """Handle binary frames. Without it, they are answered with an error."""
        self.binary_handler = handler
        return handler

    def on_frame(self, handler: FrameHandler) -> FrameHandler:
        """Take every data frame as it arrives, text or binary, with no JSON decoding.

        When set, `on()`, `on_unknown()` and `on_binary()` are not used.
        """
        self.frame_handler = handler
        return handler


def resolve(spec: str) -> tuple[str, str]:
    """Split an `app.module` value into module and attribute (default attribute `app`)."""
    spec = BUILTIN.get(spec, spec)
    module, _, attribute = spec.partition(":")
    return module, attribute or "app"


def check(spec: str) -> None:
    """Check, without importing it, that the application module can be found.

    Raises:
        ConfigError: naming `app.module`.
    """
    module, _ = resolve(spec)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"app.module: no module named {module!r} ({exc})") from exc
    if found is None:
        raise ConfigError(f"app.module: no module named {module!r}")


def load(spec: str, settings: dict[str, Any]) -> App:
    """Import the application named by `app.module` and give it its settings.

    Raises:
        BootError: the import failed, the attribute is not an `App`, or its settings
            are invalid.
    """
    module_name, attribute = resolve(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BootError(f"app.module: cannot import {module_name!r}: {exc!r}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise BootError(f"app.module: {module_name}:{attribute} is not a shoal App")
    if app.settings_check is not None:
        try:
            app.settings_check(settings)
        except ConfigError as exc:
            raise BootError(str(exc)) from exc
    app.settings = settings
    return app
