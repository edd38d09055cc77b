"""Live servers for the client tests: two workers, a real Redis, tokens signed here."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from support import FAST_REDIS, RedisServer, Shoal

SECRET = "a-client-test-secret-long-enough-for-hs256-0123456789abcdefghij"


def token(sub: str, role: str | None = None, *, ttl: float = 300) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl)}
    if role is not None:
        claims["role"] = role
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def sign() -> Callable[..., str]:
    """`sign(sub, role=None, ttl=300)`: a token the `chat` node accepts."""
    return token


def chat_settings(redis_server: RedisServer) -> dict[str, Any]:
    """Authentication on but not required (guests may connect without a token), and a
    task pool of one process for `process_data`."""
    return {
        "server": {"worker_num": 2},
        "redis": {"url": redis_server.url, "prefix": f"t{uuid.uuid4().hex[:10]}", **FAST_REDIS},
        "log": {"level": "info"},
        "tasks": {"task_worker_num": 1, "modules": ["shoal.tasks.builtin"]},
        "auth": {"jwt": {"secret": SECRET}, "required": False},
    }


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Shoal]:
    """One node for a whole test module: its tests do not stop or kill it."""
    node = Shoal(tmp_path_factory.mktemp("chat"), chat_settings(redis_server)).start()
    yield node
    node.stop()
