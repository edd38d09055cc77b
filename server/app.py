"""The application API: what users write to build their own server on shoal.

An application is an `App` object with handlers, the way a Swoole server has `on('open')`,
`on('message')` and `on('close')`::

    from shoal.server.app import App, Connection

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
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from shoal.server.errors import BootError, ConfigError
from shoal.workers.connection import Connection
from shoal.workers.hub import Hub

__all__ = ["App", "Connection", "Hub", "check", "load", "resolve"]

OpenHandler = Callable[[Connection], Awaitable[None]]
MessageHandler = Callable[[Connection, dict[str, Any]], Awaitable[None]]
FrameHandler = Callable[[Connection, str | bytes], Awaitable[None]]
BinaryHandler = Callable[[Connection, bytes], Awaitable[None]]
DepartedHandler = Callable[[Hub, str, list[str]], Awaitable[None]]
_F = TypeVar("_F", bound=Callable[..., Awaitable[None]])

BUILTIN = {
    "chat": "shoal.server.apps.chat:app",
    "echo": "shoal.server.apps.echo:app",
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

    def on_open(self, handler: OpenHandler) -> OpenHandler:
        """Run after a client connected and its state is in Redis."""
        self.open_handler = handler
        return handler

    def on_close(self, handler: OpenHandler) -> OpenHandler:
        """Run when a client is gone, whatever the cause, before its state is removed.

        Rooms and channels the handler does not leave are left afterwards, silently.
        """
        self.close_handler = handler
        return handler

    def on_departed(self, handler: DepartedHandler) -> DepartedHandler:
        """Run as `handler(hub, user_id, rooms)` for each connection that vanished with a
        worker or node that died: no `on_close` ran for it, and its state is already gone.

        It runs on one live worker of the node that cleaned up after the dead one, so that
        the application can tell the rooms, as `on_close` does for an ordinary close.
        """
        self.departed_handler = handler
        return handler

    def on(self, message_type: str) -> Callable[[_F], _F]:
        """Handle JSON text messages whose `type` is `message_type`."""

        def register(handler: _F) -> _F:
            self.handlers[message_type] = handler
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
        BootError: the import failed or the attribute is not an `App`.
    """
    module_name, attribute = resolve(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BootError(f"app.module: cannot import {module_name!r}: {exc!r}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise BootError(f"app.module: {module_name}:{attribute} is not a shoal App")
    app.settings = settings
    return app
