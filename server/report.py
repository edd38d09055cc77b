"""What the master tells the outside about its node: the service manager (systemd's
notify protocol, `shoal.server.notify`) and `shoal status` / `shoal reload` (the status
file, `shoal.server.status`).

The master calls `tick()` on every turn of its loop and tells it of reloads and of the
stop; this reads the rest from the master's supervisor and scoreboard (`Node`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from shoal.config.model import Config
from shoal.core.resp import RedisAddress
from shoal.core.scoreboard import Scoreboard
from shoal.server import status
from shoal.server.notify import Notifier
from shoal.server.supervisor import Kind, Rolled, Supervisor
from shoal.workers import tls

logger = logging.getLogger(__name__)

STATUS_EVERY = 10.0  # seconds between STATUS= lines when nothing changes
SNAPSHOT_EVERY = 1.0  # seconds between rewrites of the status file
RETRY_AFTER = 60.0  # seconds before writing a status file that could not be written


class Node(Protocol):
    """What of the master a report reads (`shoal.server.master.Master`)."""

    @property
    def config(self) -> Config: ...
    @property
    def node_id(self) -> str: ...
    @property
    def tasks_only(self) -> bool: ...
    @property
    def task_processes(self) -> int: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def scoreboard(self) -> Scoreboard: ...
    @property
    def seats(self) -> dict[int, int]: ...


class Report:
    """The node's state as the outside sees it.

    Args:
        node: the master.
        notifier: the service manager's socket (a no-op without one).
        status_path: where to write the status file.
        embedded: the node runs its own Redis.
    """

    def __init__(
        self, node: Node, notifier: Notifier, status_path: Path, *, embedded: bool
    ) -> None:
        self.node = node
        self.notifier = notifier
        self.status_path = status_path
        self.embedded = embedded
        self.started_at = time.time()
        self.serving = False  # every worker was ready once: READY=1 was sent
        self.reloads = 0
        self.reload_at = 0.0  # unix time the running reload began
        self.last_reload: status.Reload | None = None
        self.next_watchdog = self.next_status = self.next_snapshot = 0.0

    def tick(self, now: float) -> None:
        """On every turn of the master's loop (`now` from `time.monotonic()`)."""
        sup = self.node.supervisor
        if not self.serving and not sup.stopping and self._all_ready():
            self.serving = True
            self.notifier.ready()
            logger.info("shoal node %s ready", self.node.node_id)
            self.next_status = 0.0
        interval = self.notifier.watchdog_interval
        if interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + interval / 2
        if self.notifier.enabled and now >= self.next_status and not sup.stopping:
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self._status_line())
        if now >= self.next_snapshot:
            self.next_snapshot = now + SNAPSHOT_EVERY
            try:
                status.write(self.status_path, self._snapshot(now))
            except OSError as exc:
                logger.warning("cannot write the status file %s: %s", self.status_path, exc)
                self.next_snapshot = now + RETRY_AFTER

    # Events

    def reload_started(self) -> None:
        """A reload begins (not one asked for while another runs: that one follows it)."""
        self.reload_at = time.time()
        if self.serving:
            self.notifier.reloading()
            self.notifier.status("reloading")

    def reload_refused(self, reason: str) -> None:
        """A reload did not begin (the file is invalid): `shoal reload` must hear so."""
        self._record(status.Reload(at=time.time(), ok=False, seconds=0.0, reason=reason))

    def reload_done(self, rolled: Rolled) -> None:
        if self.serving:
            self.notifier.ready()
            self.next_status = 0.0
        # A reload asked for while one ran starts as this one ends.
        at, self.reload_at = self.reload_at, time.time()
        self._record(
            status.Reload(at=at, ok=rolled.ok, seconds=rolled.seconds, reason=rolled.reason)
        )

    def stopping(self) -> None:
        self.notifier.stopping()
        self.notifier.status("stopping")

    def close(self) -> None:
        self.notifier.close()
        with contextlib.suppress(OSError):
            self.status_path.unlink()

    def _record(self, reload: status.Reload) -> None:
        self.reloads += 1
        self.last_reload = reload
        self.next_snapshot = 0.0

    # What is reported

    def _all_ready(self) -> bool:
        sup = self.node.supervisor
        kind = Kind.TASKS if self.node.tasks_only else Kind.WEBSOCKET
        ready = {
            child.slot
            for child in sup.children.values()
            if child.kind is kind and child.ready_at is not None
        }
        return all(slot in ready for k, slot in sup.slots if k is kind)

    def _status_line(self) -> str:
        node, sup = self.node, self.node.supervisor
        if sup.stopping:
            return "stopping"
        state = "reloading; " if sup.reloading is not None else ""
        if node.tasks_only:
            return f"{state}task pool of {node.task_processes} processes"
        workers = len(sup.worker_slots())
        return f"{state}{workers} workers, {node.scoreboard.connections()} connections"

    def _snapshot(self, now: float) -> status.Snapshot:
        node, sup, board = self.node, self.node.supervisor, self.node.scoreboard
        wall = time.time()
        server = node.config.server
        workers: list[status.Worker] = []
        housekeeper: status.Housekeeper | None = None
        task_pool: status.TaskPool | None = None
        redis_up: list[bool] = []
        for child in sup.children.values():
            seat = node.seats.get(child.pid)
            started_at = wall - (now - child.started)
            if child.kind is Kind.WEBSOCKET and seat is not None:
                if child.retiring_since is not None:
                    state: status.WorkerState = "retiring"
                elif child.ready_at is not None:
                    state = "serving"
                    redis_up.append(board.redis_up(seat))
                else:
                    state = "starting"
                workers.append(
                    status.Worker(
                        slot=child.slot,
                        pid=child.pid,
                        generation=child.generation,
                        started_at=started_at,
                        state=state,
                        connections=board.connections_of(seat),
                        messages=board.metrics.messages_in(seat),
                    )
                )
            elif child.kind is Kind.HOUSEKEEPER:
                housekeeper = status.Housekeeper(pid=child.pid, started_at=started_at)
            elif child.kind is Kind.TASKS and child.retiring_since is None:
                task_pool = status.TaskPool(
                    pid=child.pid, started_at=started_at, processes=node.task_processes
                )
        if sup.stopping:
            state_: status.State = "stopping"
        elif sup.reloading is not None:
            state_ = "reloading"
        else:
            state_ = "running" if self.serving else "starting"
        return status.Snapshot(
            pid=os.getpid(),
            node=node.node_id,
            started_at=self.started_at,
            updated_at=wall,
            state=state_,
            listen=None
            if node.tasks_only
            else f"{tls.scheme(server)}://{server.host}:{server.port}{server.path}",
            workers=tuple(sorted(workers, key=lambda w: (w.slot, w.generation))),
            housekeeper=housekeeper,
            task_pool=task_pool,
            redis=status.Redis(
                address=str(RedisAddress.from_url(node.redis_url)),
                embedded=self.embedded,
                up=all(redis_up) if redis_up else None,
            ),
            reloads=self.reloads,
            last_reload=self.last_reload,
        )
