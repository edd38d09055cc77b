from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import FAST_REDIS, RedisServer, Shoal


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop and restart."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(redis_server: RedisServer, prefix: str) -> dict[str, Any]:
    return {
        "server": {"worker_num": 2},
        "redis": {"url": redis_server.url, "prefix": prefix, **FAST_REDIS},
        "log": {"level": "info"},
        # No task pool unless a test asks for one (tests/e2e/test_tasks.py): two Python
        # processes starting with every node would only add load to tests of timing.
        "tasks": {"task_worker_num": 0},
    }


@pytest.fixture
def shoal(tmp_path: Path, settings: dict[str, Any]) -> Iterator[Shoal]:
    node = Shoal(tmp_path, settings).start()
    yield node
    node.stop()


@pytest.fixture
def nodes(tmp_path: Path, settings: dict[str, Any]) -> Iterator[tuple[Shoal, Shoal]]:
    """Two nodes (two `shoal serve` on different ports) of one deployment: one Redis,
    one prefix, each with the test's `settings`."""
    first = Shoal(tmp_path / "a", settings)
    second = Shoal(tmp_path / "b", settings)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.stop()
        second.stop()
