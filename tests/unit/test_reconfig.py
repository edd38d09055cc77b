"""What a reload may change: `shoal.server.reconfig.merge` on configurations alone."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from shoal.config.model import Config
from shoal.server import reconfig


def config(**sections: dict[str, Any]) -> Config:
    return Config.model_validate(sections)


RUNNING = config(
    server={"port": 9501, "worker_num": 2},
    redis={"url": "redis://:sekret@10.0.0.1:6379/0", "heartbeat_ttl": 10},
    tasks={"task_worker_num": 2},
)


def merge(wanted: Config, *, tasks_only: bool = False) -> Config:
    return reconfig.merge(RUNNING, wanted, max_workers=8, tasks_only=tasks_only)


def test_what_may_change_changes() -> None:
    wanted = config(
        server={
            "port": 9501,
            "worker_num": 4,
            "max_message_size": 1000,
            "buffer_output_size": 4096,
        },
        redis={"url": "redis://:sekret@10.0.0.1:6379/0", "heartbeat_ttl": 10},
        tasks={"task_worker_num": 3},
        log={"level": "debug"},
    )
    assert merge(wanted) == wanted


def test_listeners_and_redis_keep_their_running_values(caplog: pytest.LogCaptureFixture) -> None:
    wanted = config(
        server={"port": 9600, "worker_num": 3},
        redis={"url": "redis://:other@10.0.0.2:6379/0", "heartbeat_ttl": 20},
        tasks={"task_worker_num": 2},
    )
    with caplog.at_level(logging.ERROR):
        merged = merge(wanted)
    assert merged.server.port == 9501
    assert merged.server.worker_num == 3  # the rest goes on
    assert merged.redis == RUNNING.redis
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "reload: server.port cannot change while shoal runs; keeping 9501 (the file says "
        "9600) until a restart",
        "reload: redis.url cannot change while shoal runs; keeping the running value (the "
        "file says another) until a restart",
        "reload: redis.heartbeat_ttl cannot change while shoal runs; keeping 10.0 (the "
        "file says 20.0) until a restart",
    ]
    assert not any("sekret" in line or "other@" in line for line in lines)


def test_the_task_pool_is_not_turned_off_or_on() -> None:
    off = config(server={"port": 9501}, redis=dict(RUNNING.redis), tasks={"task_worker_num": 0})
    assert merge(off).tasks.task_worker_num == 2
    running_without = RUNNING.model_copy(update={"tasks": off.tasks})
    on = config(server={"port": 9501}, redis=dict(RUNNING.redis), tasks={"task_worker_num": 2})
    merged = reconfig.merge(running_without, on, max_workers=8, tasks_only=False)
    assert merged.tasks.task_worker_num == 0
    # A task pool alone always has one: its process count may change.
    assert merge(off, tasks_only=True).tasks.task_worker_num == 0


def test_workers_beyond_what_the_node_can_hold_are_capped() -> None:
    wanted = config(server={"port": 9501, "worker_num": 50}, redis=dict(RUNNING.redis))
    assert merge(wanted).server.worker_num == 8
