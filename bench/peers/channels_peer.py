"""Peer server on Django Channels 4 with channels_redis, speaking shoal's protocol subset.

The stack most Python teams run for rooms across processes: a consumer per connection,
groups on channels_redis' Redis pub/sub layer (`RedisPubSubChannelLayer`), served by one
uvicorn worker. It starts its own `redis-server` as a child process, so that
`shoal-bench --server-pid` counts Redis's CPU and memory as the server's, as it does for
shoal's embedded Redis.

Protocol subset: `welcome`; `join_room` (answered with the joiner as the only listed
member: Channels' groups cannot be listed); `room_message` and `broadcast` through
groups (the sender of a broadcast filters itself out, groups having no exclusion);
`private` through a group per user (it cannot tell an unknown user); anything else is
echoed. `--echo` echoes every frame verbatim.

Needs the `peers` extra (`pip install 'shoal[peers]'`).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

from shoal.core import schema

_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_PR_SET_PDEATHSIG = 1


def _group(kind: str, name: str) -> str:
    """A Channels group name: ASCII letters, digits, `_.-`, under 100 characters."""
    return f"{kind}.{_GROUP_UNSAFE.sub('_', name)}"[:99]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_redis(directory: Path) -> str:
    """A private redis-server on a unix socket, a child of this process; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("channels_peer: redis-server is not installed")
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        # uvicorn ends by re-raising the SIGTERM it handled, which skips atexit hooks:
        # the kernel stops Redis when this process goes, however it goes.
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - no thread runs yet (before Django, uvicorn)
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("channels_peer: redis-server did not start")
        time.sleep(0.02)
    return f"unix://{sock}"


def build_application(redis_url: str, raw_echo: bool) -> Any:
    """Configure Django and return the ASGI application."""
    import django  # noqa: PLC0415 - configured first, then imported
    from django.conf import settings  # noqa: PLC0415

    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["channels"],
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                "CONFIG": {"hosts": [redis_url]},
            }
        },
    )
    django.setup()
    from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: PLC0415
    from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: PLC0415
    from django.urls import path  # noqa: PLC0415

    class EchoConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
        async def receive(
            self, text_data: str | None = None, bytes_data: bytes | None = None
        ) -> None:
            await self.send(text_data=text_data, bytes_data=bytes_data)

    class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
        async def connect(self) -> None:
            query = parse_qs(self.scope.get("query_string", b"").decode())
            self.user = query.get("user_id", [f"user-{id(self)}"])[0]
            await self.accept()
            await self.channel_layer.group_add("all", self.channel_name)
            await self.channel_layer.group_add(_group("user", self.user), self.channel_name)
            welcome: schema.Welcome = {
                "type": "welcome",
                "user_id": self.user,
                "connection_id": self.channel_name,
            }
            await self.send(text_data=orjson.dumps(welcome).decode())

        async def receive(
            self, text_data: str | None = None, bytes_data: bytes | None = None
        ) -> None:
            try:
                message: dict[str, Any] = orjson.loads(text_data or "")
            except orjson.JSONDecodeError:
                error: schema.Error = {"type": "error", "message": "Invalid message format"}
                await self.send(text_data=orjson.dumps(error).decode())
                return
            kind = message.get("type")
            now = int(time.time() * 1000)
            layer = self.channel_layer
            if kind == "join_room":
                room = str(message.get("room"))
                await layer.group_add(_group("room", room), self.channel_name)
                joined: schema.JoinedRoom = {
                    "type": "joined_room",
                    "room": room,
                    "members": [self.user],
                    "total_members": 1,
                }
                await self.send(text_data=orjson.dumps(joined).decode())
            elif kind == "room_message":
                room = str(message.get("room"))
                out: schema.RoomMessage = {
                    "type": "room_message",
                    "from": self.user,
                    "room": room,
                    "message": message.get("message"),
                    "timestamp": now,
                }
                await self.to_group(_group("room", room), out)
            elif kind == "broadcast":
                to_all: schema.Broadcast = {
                    "type": "broadcast",
                    "from": self.user,
                    "message": message.get("message"),
                    "timestamp": now,
                }
                await self.to_group("all", to_all, skip=self.channel_name)
            elif kind == "private":
                target = str(message.get("to"))
                private: schema.PrivateMessage = {
                    "type": "private_message",
                    "from": self.user,
                    "message": message.get("message"),
                    "timestamp": now,
                }
                await self.to_group(_group("user", target), private)
                sent: schema.MessageSent = {"type": "message_sent", "to": target, "timestamp": now}
                await self.send(text_data=orjson.dumps(sent).decode())
            else:
                echo: schema.Echo = {"type": "echo", "data": message}
                await self.send(text_data=orjson.dumps(echo).decode())

        async def to_group(
            self, group: str, message: Mapping[str, Any], skip: str | None = None
        ) -> None:
            """Send `message` to a group's members, but `skip` (the sender of a broadcast)."""
            event = {"type": "deliver", "text": orjson.dumps(message).decode(), "skip": skip}
            await self.channel_layer.group_send(group, event)

        async def deliver(self, event: dict[str, Any]) -> None:
            if event.get("skip") != self.channel_name:
                await self.send(text_data=event["text"])

    consumer = EchoConsumer if raw_echo else ChatConsumer
    return ProtocolTypeRouter({"websocket": URLRouter([path("ws", consumer.as_asgi())])})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--echo", action="store_true", help="echo every frame verbatim")
    args = parser.parse_args(argv)
    import uvicorn  # noqa: PLC0415 - the peers extra

    directory = Path(tempfile.mkdtemp(prefix="channels-peer-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    application = build_application(_start_redis(directory), args.echo)
    uvicorn.run(
        application,
        host=args.host,
        port=args.port,
        ws="websockets-sansio",
        loop="uvloop",
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
