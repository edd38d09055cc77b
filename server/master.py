"""The master process: validate once, fork its children, keep them alive, stop them cleanly.

Like gunicorn's arbiter, signal handlers only queue the signal; the main loop dispatches
it, reaps children with `waitpid(-1)` (so that no process becomes a zombie when shoal
runs as PID 1 in a container), and carries out what the supervision policy
(`shoal.server.supervisor`) decides.

The master talks to Redis only before it forks, to check it. After that, everything
Redis must hear (a worker died) goes to the housekeeper child through a pipe: a hung
Redis cannot delay a respawn, a signal or a stop.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import secrets
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

import redis

from shoal.config.model import Config
from shoal.core import logs
from shoal.core.errors import ConfigError, ShoalError
from shoal.core.resp import RedisAddress
from shoal.core.schema import CloseCode
from shoal.core.scoreboard import Scoreboard
from shoal.server import housekeeper
from shoal.server.embedded import EmbeddedRedis
from shoal.server.supervisor import Action, Fail, Kind, Policy, Signal, Spawn, Supervisor
from shoal.tasks import process as task_pool
from shoal.workers import worker

logger = logging.getLogger(__name__)

_TICK = 0.25
EXIT_FAILURE = 1
# Redis 6.2 brought SET ... GET, on which a worker's heartbeat learns in one round trip
# whether its state was swept or lost while it was away.
MIN_REDIS_VERSION = (6, 2)


class Master:
    """The master of one node.

    Args:
        config: the validated configuration.
        tasks_only: run a task pool alone, with no WebSocket listener (`shoal tasks`).
    """

    def __init__(self, config: Config, *, tasks_only: bool = False) -> None:
        self.config = config
        self.node_id = config.server.node_id or secrets.token_hex(3)
        self.tasks_only = tasks_only
        server = config.server
        plan = {} if tasks_only else {Kind.WEBSOCKET: server.worker_num, Kind.HOUSEKEEPER: 1}
        self.task_processes = config.task_processes
        if tasks_only and not self.task_processes:
            self.task_processes = len(os.sched_getaffinity(0))
        if self.task_processes:
            plan[Kind.TASKS] = 1
        if config.redis.embedded:
            plan[Kind.REDIS] = 1
        self.supervisor = Supervisor(
            plan,
            Policy(worker_timeout=server.worker_timeout),
            boot_exit=worker.EXIT_BOOT,
        )
        # Two seats per worker: a rolling reload runs an old and a new one side by side.
        self.scoreboard = Scoreboard(2 * server.worker_num + 3)
        self.seats: dict[int, int] = {}
        self.worker_ids: dict[int, str] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = config.redis.url
        self.redis_started = False
        self.dead_workers: list[str] = []
        self.housekeeper_fd: int | None = None
        self._wakeup_r, self._wakeup_w = -1, -1

    # Entry point

    def run(self) -> int:
        """Serve until stopped. Returns the process exit status.

        Raises:
            ShoalError: startup failed (Redis unreachable, port taken, ...), before any
                worker was started.
        """
        server = self.config.server
        logs.set_role("master")
        if not self.tasks_only:
            _check_port_free(server.host, server.port)
        if self.config.redis.embedded:
            self.embedded = EmbeddedRedis(self.config.redis.server_bin)
            self.redis_url = self.embedded.url
        try:
            if self.embedded is None:
                _check_redis(self.redis_url, self.config.redis.connect_timeout)
            self._install_signals()
            if self.tasks_only:
                logger.info(
                    "shoal task node %s: %d task processes, redis %s, prefix %r",
                    self.node_id,
                    self.task_processes,
                    RedisAddress.from_url(self.redis_url),
                    self.config.redis.prefix,
                )
            else:
                logger.info(
                    "shoal node %s: %d workers on ws://%s:%d%s, redis %s, prefix %r",
                    self.node_id,
                    server.worker_num,
                    server.host,
                    server.port,
                    server.path,
                    "embedded" if self.embedded else RedisAddress.from_url(self.redis_url),
                    self.config.redis.prefix,
                )
            # Objects the children inherit stay out of the collector's sight, so a
            # collection in a worker does not copy the master's pages it shares.
            gc.freeze()
            self._execute(self.supervisor.start(time.monotonic()))
            while self.supervisor.running():
                self._wait()
                while self.signals:
                    self._dispatch(self.signals.popleft())
                self._reap()
                self._observe()
                self._execute(self.supervisor.tick(time.monotonic()))
                self._notify_housekeeper()
        finally:
            if self.embedded is not None:
                self.embedded.cleanup()
        if self.supervisor.failure is not None:
            logger.error("shoal stopped: %s", self.supervisor.failure)
            return EXIT_FAILURE
        logger.info("shoal node %s stopped", self.node_id)
        return 0

    # Signals

    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w)
        for signum in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGQUIT,
            signal.SIGHUP,
            signal.SIGCHLD,
        ):
            signal.signal(signum, self._queue_signal)

    def _queue_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _wait(self) -> None:
        try:
            ready, _, _ = select.select([self._wakeup_r], [], [], _TICK)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _dispatch(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reaped on every turn of the loop
        if signum == signal.SIGHUP:
            logger.warning("SIGHUP: reloading is not supported in this version; ignoring")
            return
        name = signal.Signals(signum).name
        if self.supervisor.stopping:
            logger.warning("%s again: killing every child now", name)
        else:
            logger.info("%s: stopping; workers close their clients with 1001", name)
        self._stop()

    def _stop(self) -> None:
        for pid, seat in self.seats.items():
            if pid in self.worker_ids:
                self.scoreboard.set_close_code(seat, CloseCode.GOING_AWAY)
        now = time.monotonic()
        self._execute(self.supervisor.stop(now, self.config.server.shutdown_timeout))

    # Carrying out the policy

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(action)
            elif isinstance(action, Signal):
                self._signal(action)
            elif isinstance(action, Fail):
                logger.error("%s; stopping", action.reason)
                self._stop()

    def _signal(self, action: Signal) -> None:
        child = self.supervisor.children.get(action.pid)
        if action.signum in (signal.SIGABRT, signal.SIGKILL) and child is not None:
            logger.error(
                "%s %s; sending %s",
                child.name,
                action.why,
                signal.Signals(action.signum).name,
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(action.pid, action.signum)

    def _spawn(self, spawn: Spawn) -> None:
        now = time.monotonic()
        if spawn.kind is Kind.REDIS:
            assert self.embedded is not None
            pid = self.embedded.spawn()
            if not self.redis_started:
                self.embedded.wait_ready(pid)
                _check_redis(self.redis_url, self.config.redis.connect_timeout)
                self.redis_started = True
            else:
                logger.info("embedded redis restarted (pid %d)", pid)
            self.supervisor.started(spawn, pid, now)
            return
        seat = self.scoreboard.free_seat()
        if spawn.kind is Kind.HOUSEKEEPER:
            inbox, outbox = os.pipe2(os.O_CLOEXEC)
            pid = self._fork(lambda: self._housekeeper(seat, inbox, outbox))
            os.close(inbox)
            os.set_blocking(outbox, False)
            self._close_housekeeper_fd()
            self.housekeeper_fd = outbox
        elif spawn.kind is Kind.TASKS:
            pid = self._fork(lambda: self._task_pool(seat))
        else:
            pid = self._fork(lambda: self._worker(spawn.slot, seat))
            self.worker_ids[pid] = worker.worker_id(self.node_id, spawn.slot, pid)
        self.scoreboard.claim(seat, pid, now, serving=spawn.kind is Kind.WEBSOCKET)
        self.seats[pid] = seat
        child = self.supervisor.started(spawn, pid, now)
        logger.debug("started %s, generation %d", child.name, child.generation)

    def _fork(self, body: Callable[[], int]) -> int:
        pid = os.fork()
        if pid:
            return pid
        status = EXIT_FAILURE
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._close_housekeeper_fd()
            for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            status = body()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _worker(self, slot: int, seat: int) -> int:
        logs.set_role(f"worker {slot}")
        return worker.run(
            worker.Placement(
                self.config,
                slot,
                seat,
                self.node_id,
                self.redis_url,
                self.scoreboard,
                master_pid=os.getppid(),
            )
        )

    def _housekeeper(self, seat: int, inbox: int, outbox: int) -> int:
        os.close(outbox)
        logs.set_role("housekeeper")
        return housekeeper.run(
            housekeeper.Placement(
                self.config,
                seat,
                self.node_id,
                self.redis_url,
                self.scoreboard,
                master_pid=os.getppid(),
                inbox=inbox,
            )
        )

    def _task_pool(self, seat: int) -> int:
        logs.set_role("task pool")
        return task_pool.run(
            task_pool.Placement(
                self.config,
                seat,
                self.node_id,
                self.redis_url,
                self.scoreboard,
                master_pid=os.getppid(),
                processes=self.task_processes,
            )
        )

    # Children that exit

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, os.waitstatus_to_exitcode(status))

    def _exited(self, pid: int, code: int) -> None:
        seat = self.seats.pop(pid, None)
        if seat is not None:
            # It may have become ready since the last turn: read its seat before freeing it.
            self.supervisor.observe(
                pid, ready=self.scoreboard.is_ready(seat), beat=self.scoreboard.last_beat(seat)
            )
            self.scoreboard.release(seat)
        wid = self.worker_ids.pop(pid, None)
        exit_info, actions = self.supervisor.exited(pid, code, time.monotonic())
        if exit_info is None:
            logger.debug("reaped process %d (not a child of shoal's)", pid)
            return
        child = exit_info.child
        if child.kind is Kind.HOUSEKEEPER:
            self._close_housekeeper_fd()
        elif child.kind is Kind.TASKS:
            # The task processes go with it: they are in its process group
            # (`shoal.tasks.process`), and also exit when their input ends.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if exit_info.expected:
            logger.info("%s stopped: %s", child.name, how)
        elif self.supervisor.failure is None:
            when = "while starting" if child.ready_at is None else ""
            then = (
                f"respawning in {exit_info.delay:.1f} s (crash loop)"
                if exit_info.crash_loop
                else "respawning"
            )
            logger.error("%s died%s: %s; %s", child.name, f" {when}" if when else "", how, then)
        if wid is not None:
            self.dead_workers.append(wid)
        self._execute(actions)

    def _observe(self) -> None:
        for pid, seat in self.seats.items():
            self.supervisor.observe(
                pid,
                ready=self.scoreboard.is_ready(seat),
                beat=self.scoreboard.last_beat(seat),
            )

    # The housekeeper's inbox

    def _notify_housekeeper(self) -> None:
        """Hand dead workers to the housekeeper; keep them while it is not there."""
        while self.dead_workers and self.housekeeper_fd is not None:
            try:
                os.write(self.housekeeper_fd, self.dead_workers[0].encode() + b"\n")
            except (BlockingIOError, BrokenPipeError):
                return
            self.dead_workers.pop(0)

    def _close_housekeeper_fd(self) -> None:
        if self.housekeeper_fd is not None:
            os.close(self.housekeeper_fd)
            self.housekeeper_fd = None


def _check_redis(url: str, timeout: float) -> None:
    """Check, before forking, that Redis answers and is recent enough.

    Raises:
        ShoalError: naming `redis.url`, without its password.
    """
    address = RedisAddress.from_url(url)
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        info = client.info("server")
    except redis.RedisError as exc:
        raise ShoalError(f"redis.url: cannot connect to {address}: {exc}") from exc
    finally:
        client.close()
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if parts < MIN_REDIS_VERSION:
        raise ShoalError(
            f"redis.url: {address} runs Redis {version}; shoal needs "
            f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
        )


def _check_port_free(host: str, port: int) -> None:
    """Fail early if anything listens on the port, another shoal included.

    Workers bind with SO_REUSEPORT, which would silently share the port with another
    shoal of the same user; this probe binds without it, so any listener makes it fail.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"server.host: cannot resolve {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(
                    f"server.port: cannot listen on {host}:{port}: {exc.strerror}"
                ) from exc
