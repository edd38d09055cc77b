"""What a reload may change in a running node: the re-read configuration, less what
cannot change in place, which keeps its running value with one error line each.

A running node cannot move its listeners (`server.host`, `port`, `path`, `backlog`,
`admin_host`, `admin_port`),
rename itself (`server.node_id`), or change anything of its Redis (`redis.*`: where its
state is, and the timings its housekeeper, which a reload keeps, shares with the
workers); it cannot turn its task pool on or off; and it cannot grow past the number
of workers its shared memory was sized for.
"""

from __future__ import annotations

import logging
from typing import Any

from shoal.config.model import Config, RedisConfig

logger = logging.getLogger(__name__)

FIXED = (
    *(
        ("server", key)
        for key in ("host", "port", "path", "node_id", "backlog", "admin_host", "admin_port")
    ),
    *(("redis", key) for key in RedisConfig.model_fields),
)


def merge(running: Config, wanted: Config, *, max_workers: int, tasks_only: bool) -> Config:
    """The configuration a reload applies: `wanted`, with what cannot change kept as it
    is in `running`. Each refusal is logged.

    Args:
        max_workers: the most workers this node can run.
        tasks_only: the node is a task pool alone (`shoal tasks`), which always has one.
    """
    config = wanted
    for section, key in FIXED:
        old = getattr(getattr(running, section), key)
        new = getattr(getattr(config, section), key)
        if new != old:
            secret = key == "url"  # it may hold a password
            logger.error(
                "reload: %s.%s cannot change while shoal runs; keeping %s (the file "
                "says %s) until a restart",
                section,
                key,
                "the running value" if secret else repr(old),
                "another" if secret else repr(new),
            )
            config = _with(config, section, key, old)
    had_tasks = tasks_only or bool(running.task_processes)
    has_tasks = tasks_only or bool(config.task_processes)
    if had_tasks != has_tasks:
        logger.error(
            "reload: tasks.task_worker_num cannot turn the task pool %s while shoal "
            "runs; keeping it %s until a restart",
            "on" if has_tasks else "off",
            "on" if had_tasks else "off",
        )
        config = _with(config, "tasks", "task_worker_num", running.tasks.task_worker_num)
    if config.server.worker_num > max_workers:
        logger.error(
            "reload: server.worker_num %d is more than this node can grow to (%d); using %d",
            config.server.worker_num,
            max_workers,
            max_workers,
        )
        config = _with(config, "server", "worker_num", max_workers)
    return config


def _with(config: Config, section: str, key: str, value: Any) -> Config:
    part = getattr(config, section).model_copy(update={key: value})
    return config.model_copy(update={section: part})
