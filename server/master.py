"""The master process: validate once, fork its children, keep them alive, stop them cleanly.

Like gunicorn's arbiter, signal handlers only queue the signal; the main loop dispatches
it, reaps children with `waitpid(-1)` (so that no process becomes a zombie when shoal
runs as PID 1 in a container), and carries out what the supervision policy
(`shoal.server.supervisor`) decides.

The master talks to Redis only before it forks, to check it. After that, everything
Redis must hear (a worker died) goes to the housekeeper child through a pipe: a hung
Redis cannot delay a respawn, a signal or a stop.

The master owns every WebSocket slot's listening socket (SO_REUSEPORT, one per slot):
a worker inherits its slot's socket, and a reload or a respawn leaves it open, so what
its accept queue holds is taken by the next worker of the slot instead of being reset
(closing an SO_REUSEPORT listener resets its queue unless `net.ipv4.tcp_migrate_req`
is on). Only removing a slot (SIGTTOU) closes one; its worker drains it first.

Signals (docs/operations.md): SIGHUP re-reads the config file and replaces every worker
and the task pool, one at a time; SIGUSR1 does the same without re-reading; SIGUSR2
replaces the task pool alone; SIGTTIN / SIGTTOU add or remove a worker; SIGTERM and
SIGINT stop gracefully (a second one kills); SIGQUIT kills every child at once.
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
from shoal.server import housekeeper, limits, listeners, pidfile, reconfig, status
from shoal.server.embedded import EmbeddedRedis
from shoal.server.notify import Notifier
from shoal.server.report import Report
from shoal.server.supervisor import (
    Action,
    Drop,
    Fail,
    Kind,
    Policy,
    Retire,
    Rolled,
    Signal,
    Spawn,
    Supervisor,
)
from shoal.tasks import process as task_pool
from shoal.workers import demo, tls, worker

logger = logging.getLogger(__name__)

_TICK = 0.25
EXIT_FAILURE = 1
# Redis 6.2 brought SET ... GET, on which a worker's heartbeat learns in one round trip
# whether its state was swept or lost while it was away.
MIN_REDIS_VERSION = (6, 2)
# SIGTTIN adds workers up to this many times `server.worker_num` (at least 64): the
# scoreboard's shared memory is sized once, before the first fork.
MAX_WORKERS_FACTOR = 4
MIN_MAX_WORKERS = 64
Reader = Callable[[], Config]


class Master:
    """The master of one node.

    Args:
        config: the validated configuration.
        tasks_only: run a task pool alone, with no WebSocket listener (`shoal tasks`).
        reread: reads the configuration again, as it was read for `config`, for SIGHUP;
            None: SIGHUP reloads without re-reading.
    """

    def __init__(
        self, config: Config, *, tasks_only: bool = False, reread: Reader | None = None
    ) -> None:
        self.config = config
        self.reread = reread
        self.node_id = config.server.node_id or secrets.token_hex(3)
        self.tasks_only = tasks_only
        server = config.server
        plan = {} if tasks_only else {Kind.WEBSOCKET: server.worker_num, Kind.HOUSEKEEPER: 1}
        self.task_processes = self._task_processes(config)
        if self.task_processes:
            plan[Kind.TASKS] = 1
        if config.redis.embedded:
            plan[Kind.REDIS] = 1
        self.supervisor = Supervisor(plan, _policy(config), boot_exit=worker.EXIT_BOOT)
        self.max_workers = max(MIN_MAX_WORKERS, MAX_WORKERS_FACTOR * server.worker_num)
        # Two seats per worker: a rolling reload runs an old and a new one side by side.
        self.scoreboard = Scoreboard(2 * self.max_workers + 4)
        self.listeners: dict[int, list[socket.socket]] = {}
        self.seats: dict[int, int] = {}
        self.worker_ids: dict[int, str] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = config.redis.url
        self.redis_started = False
        self.dead_workers: list[str] = []
        self.housekeeper_fd: int | None = None
        self._wakeup_r, self._wakeup_w = -1, -1
        self.pid_path = pidfile.resolve(server, name="shoal-tasks" if tasks_only else "shoal")
        # Now, before anything is spawned: no child inherits the service manager's socket.
        self.report = Report(
            self,
            Notifier.from_environ(),
            status.path_for(self.pid_path),
            embedded=config.redis.embedded,
        )

    def _task_processes(self, config: Config) -> int:
        if self.tasks_only and not config.task_processes:
            return len(os.sched_getaffinity(0))
        return config.task_processes

    # Entry point

    def run(self) -> int:
        """Serve until stopped. Returns the process exit status.

        Raises:
            ShoalError: startup failed (Redis unreachable, port taken, ...), before any
                worker was started.
        """
        server = self.config.server
        logs.set_role("master")
        warning = limits.raise_nofile(server.max_connection, server.worker_num)
        if warning is not None:
            logger.warning("%s", warning)
        with pidfile.PidFile(self.pid_path):
            try:
                return self._run()
            finally:
                self.report.close()

    def _run(self) -> int:
        server = self.config.server
        if not self.tasks_only:
            _check_port_free(server.host, server.port)
            if server.admin_port is not None:
                admin_keys = ("server.admin_host", "server.admin_port")
                _check_port_free(server.admin_host, server.admin_port, admin_keys)
            for slot in range(server.worker_num):
                self.listeners[slot] = listeners.open_listeners(server)
        if self.config.redis.embedded:
            self.embedded = EmbeddedRedis(
                self.config.redis.server_bin, self.config.limits.subscriber_backlog
            )
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
                    "shoal node %s: %d workers on %s://%s:%d%s, redis %s, prefix %r",
                    self.node_id,
                    server.worker_num,
                    tls.scheme(server),
                    server.host,
                    server.port,
                    server.path,
                    "embedded" if self.embedded else RedisAddress.from_url(self.redis_url),
                    self.config.redis.prefix,
                )
                if server.demo_page:
                    logger.info("browser demo page: %s", demo.url(server))
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
                self.report.tick(time.monotonic())
        finally:
            for slot in list(self.listeners):
                self._drop_listener(slot)
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
        for signum in _SIGNALS:
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
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            if signum == signal.SIGQUIT:
                logger.warning("SIGQUIT: stopping now; killing every child")
            elif self.supervisor.stopping:
                logger.warning("%s again: killing every child now", name)
            else:
                logger.info("%s: stopping; workers close their clients with 1001", name)
            self._stop(now=signum == signal.SIGQUIT)
            return
        if self.supervisor.stopping:
            logger.info("%s ignored: stopping", name)
            return
        now = time.monotonic()
        if signum == signal.SIGHUP:
            self._reload(now, reread=True)
        elif signum == signal.SIGUSR1:
            self._reload(now, reread=False)
        elif signum == signal.SIGUSR2:
            if Kind.TASKS not in self.supervisor.plan or not self.supervisor.plan[Kind.TASKS]:
                logger.warning("SIGUSR2: this node runs no task pool; nothing to restart")
                return
            logger.info("SIGUSR2: replacing the task pool")
            self._begin_reload()
            self._execute(self.supervisor.reload(now, (Kind.TASKS,)))
        elif signum in (signal.SIGTTIN, signal.SIGTTOU) and not self.tasks_only:
            workers = len(self.supervisor.worker_slots())
            self._scale(now, workers + (1 if signum == signal.SIGTTIN else -1), name)

    def _stop(self, *, now: bool = False) -> None:
        if not self.supervisor.stopping:
            self.report.stopping()
        for pid, seat in self.seats.items():
            if pid in self.worker_ids:
                self.scoreboard.set_close_code(seat, CloseCode.GOING_AWAY)
        if now:
            self._execute(self.supervisor.kill(time.monotonic()))
        else:
            self._execute(
                self.supervisor.stop(time.monotonic(), self.config.server.shutdown_timeout)
            )

    # Reloads and scaling

    def _reload(self, now: float, *, reread: bool) -> None:
        if self.tasks_only:
            kinds: tuple[Kind, ...] = (Kind.TASKS,)
        else:
            kinds = (Kind.WEBSOCKET, Kind.TASKS)
        if reread and self.reread is not None:
            logger.info("SIGHUP: reading the configuration again, then replacing every worker")
            try:
                config = self.reread()
            except ShoalError as exc:
                logger.error("reload: the configuration is invalid; nothing changed:\n%s", exc)
                self.scoreboard.metrics.count_reload(0.0, ok=False)
                self.report.reload_refused(f"invalid configuration: {exc}")
                return
            self._apply(config)
        else:
            logger.info("%s: replacing every worker", "SIGHUP" if reread else "SIGUSR1")
        if not self.tasks_only:
            self._scale(now, self.config.server.worker_num, "reload")
        self._begin_reload()
        self._execute(self.supervisor.reload(now, kinds))

    def _begin_reload(self) -> None:
        if self.supervisor.reloading is None:  # else it is done again when that one ends
            self.report.reload_started()

    def _apply(self, config: Config) -> None:
        """Take a re-read configuration, keeping what cannot change in a running node."""
        config = reconfig.merge(
            self.config, config, max_workers=self.max_workers, tasks_only=self.tasks_only
        )
        self.config = config
        self.task_processes = self._task_processes(config)
        self.supervisor.policy = _policy(config)
        logs.set_level(config.log.level)

    def _scale(self, now: float, workers: int, why: str) -> None:
        current = len(self.supervisor.worker_slots())
        if workers == current:
            return
        if not 1 <= workers <= self.max_workers:
            logger.warning(
                "%s: staying at %d workers (between 1 and %d)", why, current, self.max_workers
            )
            return
        logger.info("%s: %d workers -> %d", why, current, workers)
        self._execute(self.supervisor.scale(now, workers))

    # Carrying out the policy

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(action)
            elif isinstance(action, Signal):
                self._signal(action)
            elif isinstance(action, Retire):
                self._retire(action)
            elif isinstance(action, Drop):
                self._drop_listener(action.slot)
            elif isinstance(action, Rolled):
                self._rolled(action)
            elif isinstance(action, Fail):
                logger.error("%s; stopping", action.reason)
                self._stop()

    def _signal(self, action: Signal) -> None:
        child = self.supervisor.children.get(action.pid)
        if (
            action.signum in (signal.SIGABRT, signal.SIGKILL)
            and child is not None
            and not action.expected
        ):
            logger.error(
                "%s %s; sending %s",
                child.name,
                action.why,
                signal.Signals(action.signum).name,
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(action.pid, action.signum)

    def _retire(self, action: Retire) -> None:
        self.scoreboard.metrics.count_restart(action.reason)
        child = self.supervisor.children.get(action.pid)
        seat = self.seats.get(action.pid)
        if seat is not None:
            self.scoreboard.retire(seat, CloseCode.SERVICE_RESTART, drain=action.drain)
        if child is not None:
            logger.info("%s %s; retiring it", child.name, action.why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(action.pid, signal.SIGTERM)

    def _rolled(self, action: Rolled) -> None:
        self.report.reload_done(action)
        self.scoreboard.metrics.count_reload(action.seconds, action.ok)
        if action.ok:
            logger.info("reload done in %.1f s", action.seconds)
        else:
            logger.error(
                "reload aborted after %.1f s: %s; the workers not yet replaced keep serving",
                action.seconds,
                action.reason,
            )

    def _drop_listener(self, slot: int) -> None:
        for sock in self.listeners.pop(slot, []):
            sock.close()

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
            if spawn.slot not in self.listeners:
                try:
                    self.listeners[spawn.slot] = listeners.open_listeners(self.config.server)
                except ShoalError as exc:
                    logger.error("worker %d cannot start: %s", spawn.slot, exc)
                    self._execute(self.supervisor.not_started(spawn, time.monotonic()))
                    return
            socks = self.listeners[spawn.slot]
            pid = self._fork(lambda: self._worker(spawn.slot, seat, socks), keep=socks)
            self.worker_ids[pid] = worker.worker_id(self.node_id, spawn.slot, pid)
        self.scoreboard.claim(seat, pid, now, serving=spawn.kind is Kind.WEBSOCKET)
        self.seats[pid] = seat
        child = self.supervisor.started(spawn, pid, now)
        logger.debug("started %s, generation %d", child.name, child.generation)

    def _fork(self, body: Callable[[], int], keep: list[socket.socket] | None = None) -> int:
        pid = os.fork()
        if pid:
            return pid
        status = EXIT_FAILURE
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._close_housekeeper_fd()
            # Another slot's listener held here would outlive that slot's removal.
            for socks in self.listeners.values():
                if socks is not keep:
                    for sock in socks:
                        sock.close()
            for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            # The master's signals: a child sent one by mistake ignores it.
            for signum in _SIGNALS:
                if signum not in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGINT):
                    signal.signal(signum, signal.SIG_IGN)
            status = body()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _worker(self, slot: int, seat: int, socks: list[socket.socket]) -> int:
        logs.set_role(f"worker {slot}")
        server = self.config.server
        return worker.run(
            worker.Placement(
                self.config,
                seat,
                self.node_id,
                self.redis_url,
                self.scoreboard,
                master_pid=os.getppid(),
                slot=slot,
                listeners=tuple(s for s in socks if not listeners.is_admin(s, server)),
                admin_listeners=tuple(s for s in socks if listeners.is_admin(s, server)),
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
            if exit_info.respawn:
                self.scoreboard.metrics.count_restart(
                    "stuck" if child.aborted_at is not None else "crashed"
                )
            when = "while starting" if child.ready_at is None else ""
            if not exit_info.respawn:
                then = (
                    "the one it was to replace serves on"
                    if child.replaces is not None
                    else "its replacement takes its place"
                )
            elif exit_info.crash_loop:
                then = f"respawning in {exit_info.delay:.1f} s (crash loop)"
            else:
                then = "respawning"
            logger.error("%s died%s: %s; %s", child.name, f" {when}" if when else "", how, then)
        if exit_info.crash_loop and child.kind is Kind.WEBSOCKET:
            # Nobody will accept on it for a while: let the kernel send its
            # connections to the other workers.
            self._drop_listener(child.slot)
        if wid is not None:
            self.dead_workers.append(wid)
        self._execute(actions)

    def _observe(self) -> None:
        now = time.monotonic()
        for pid, seat in list(self.seats.items()):
            self.supervisor.observe(
                pid,
                ready=self.scoreboard.is_ready(seat),
                beat=self.scoreboard.last_beat(seat),
            )
            if self.scoreboard.recycle_requested(seat):
                self._execute(self.supervisor.recycle(pid, now))

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


_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)


def _policy(config: Config) -> Policy:
    server = config.server
    return Policy(
        worker_timeout=server.worker_timeout,
        # A replacement waits for Redis like any starting worker; a reload does not.
        ready_timeout=server.worker_timeout,
        retire_timeout=server.reload_grace + server.shutdown_timeout,
    )


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


def _check_port_free(
    host: str, port: int, keys: tuple[str, str] = ("server.host", "server.port")
) -> None:
    """Fail early if anything listens on the port, another shoal included.

    Workers bind with SO_REUSEPORT, which would silently share the port with another
    shoal of the same user; this probe binds without it, so any listener makes it fail.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{keys[0]}: cannot resolve {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(
                    f"{keys[1]}: cannot listen on {host}:{port}: {exc.strerror}"
                ) from exc
