"""The master process: validate once, fork workers, keep them alive, stop them cleanly.

Like gunicorn's arbiter, signal handlers only queue the signal; the main loop dispatches
it to `handle_term`, `handle_hup` and so on, reaps children, respawns the dead, kills the
silent, and sweeps Redis for the state of workers that died on any node.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from shoal.config.model import Config
from shoal.server import logs
from shoal.server.embedded import EmbeddedRedis
from shoal.server.errors import ConfigError, ServiceUnavailable, ShoalError
from shoal.server.scoreboard import Scoreboard
from shoal.workers import worker
from shoal.workers.keys import Keys
from shoal.workers.registry import Departure, Registry, connect

logger = logging.getLogger(__name__)

_TICK = 0.5
_MAX_BOOT_FAILURES = 3
EXIT_FAILURE = 1
_T = TypeVar("_T")


@dataclass(slots=True)
class _Child:
    slot: int
    pid: int
    id: str


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.server.node_id or secrets.token_hex(3)
        self.children: dict[int, _Child] = {}
        self.scoreboard = Scoreboard(config.server.worker_num)
        self.signals: collections.deque[int] = collections.deque()
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = config.redis.url
        self.stopping = False
        self.stop_deadline = 0.0
        self.failure: str | None = None
        self.boot_failures = 0
        self.next_sweep = 0.0
        self.untold: list[Departure] = []
        self._wakeup_r, self._wakeup_w = -1, -1

    # Entry point

    def run(self) -> int:
        """Serve until stopped. Returns the process exit status.

        Raises:
            ShoalError: startup failed (Redis unreachable, port taken, ...), before any
                worker was started.
        """
        server = self.config.server
        _check_port_free(server.host, server.port)
        try:
            self._start_redis()
            self._install_signals()
            logger.info(
                "shoal node %s: %d workers on ws://%s:%d%s, redis %s, prefix %r",
                self.node_id,
                server.worker_num,
                server.host,
                server.port,
                server.path,
                "embedded" if self.embedded else self.redis_url,
                self.config.redis.prefix,
            )
            # Objects the workers inherit stay out of the collector's sight, so a
            # collection in a worker does not copy the master's pages it shares.
            gc.freeze()
            for slot in range(server.worker_num):
                self._spawn(slot)
            while self.children or not self.stopping:
                self._wait()
                while self.signals:
                    self._dispatch(self.signals.popleft())
                self._reap()
                self._maintain()
        finally:
            if self.embedded is not None:
                self.embedded.stop()
        if self.failure is not None:
            logger.error("shoal stopped: %s", self.failure)
            return EXIT_FAILURE
        logger.info("shoal node %s stopped", self.node_id)
        return 0

    def _start_redis(self) -> None:
        if self.config.redis.embedded:
            self.embedded = EmbeddedRedis(self.config.redis.server_bin)
            self.embedded.start()
            self.redis_url = self.embedded.url
            return
        try:
            asyncio.run(self._with_registry(Registry.ping))
        except ServiceUnavailable as exc:
            raise ShoalError(
                f"redis.url: cannot connect to {self.redis_url}: {exc.__cause__}"
            ) from exc

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
            self.handle_hup()
        else:
            self.handle_term(signum)

    def handle_term(self, signum: int) -> None:
        """SIGTERM, SIGINT, SIGQUIT: stop gracefully; a second one stops at once."""
        name = signal.Signals(signum).name
        if self.stopping:
            logger.warning("%s again: killing workers now", name)
            self._signal_all(signal.SIGKILL)
            return
        logger.info("%s: stopping; workers close their clients with 1001", name)
        self._stop()

    def handle_hup(self) -> None:
        """SIGHUP: reloading is not supported yet, so it must not kill the server."""
        logger.warning("SIGHUP: reloading is not supported in this version; ignoring")

    def _stop(self) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.server.shutdown_timeout
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # Children

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_worker(slot)
        child = _Child(slot, pid, worker.worker_id(self.node_id, slot, pid))
        self.children[pid] = child
        self.scoreboard.claim(slot, pid, time.monotonic())
        logger.debug("started worker %d (pid %d)", slot, pid)

    def _become_worker(self, slot: int) -> None:
        status = EXIT_FAILURE
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            logs.set_role(f"worker {slot}")
            status = worker.run(
                worker.Placement(
                    self.config,
                    slot,
                    self.node_id,
                    self.redis_url,
                    self.scoreboard,
                    master_pid=os.getppid(),
                )
            )
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._exited(self.children.pop(pid), os.waitstatus_to_exitcode(status))

    def _exited(self, child: _Child, code: int) -> None:
        was_ready = self.scoreboard.is_ready(child.slot)
        self.scoreboard.release(child.slot)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if self.stopping:
            logger.info("worker %d (pid %d) stopped: %s", child.slot, child.pid, how)
        elif code == worker.EXIT_BOOT:
            self._fail(f"worker {child.slot} could not start (see its error above)")
        elif not was_ready:
            self.boot_failures += 1
            logger.error("worker %d (pid %d) died while starting: %s", child.slot, child.pid, how)
            if self.boot_failures >= _MAX_BOOT_FAILURES:
                self._fail(f"workers died while starting {self.boot_failures} times in a row")
            else:
                self._spawn(child.slot)
        else:
            logger.error("worker %d (pid %d) died: %s; respawning", child.slot, child.pid, how)
            self._spawn(child.slot)
        # After the respawn: the new process has a new worker id, so this cannot touch it.
        self._forget(child.id)

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            logger.error("%s; stopping", reason)
            self._stop()

    def _maintain(self) -> None:
        now = time.monotonic()
        if self.stopping:
            if now > self.stop_deadline and self.children:
                logger.warning(
                    "workers still running after server.shutdown_timeout; killing %d",
                    len(self.children),
                )
                self._signal_all(signal.SIGKILL)
                self.stop_deadline = float("inf")
            return
        timeout = self.config.server.worker_timeout
        for child in self.children.values():
            if self.scoreboard.is_ready(child.slot):
                self.boot_failures = 0
            silent = now - self.scoreboard.last_beat(child.slot)
            if silent > timeout:
                logger.error(
                    "worker %d (pid %d) silent for %.0f s (server.worker_timeout); killing it",
                    child.slot,
                    child.pid,
                    silent,
                )
                os.kill(child.pid, signal.SIGKILL)
        if self.embedded is not None and self.embedded.process is not None:
            code = self.embedded.process.poll()
            if code is not None:
                logger.error("embedded redis exited (status %s); restarting it", code)
                try:
                    self.embedded.start()
                except ShoalError as exc:
                    self._fail(str(exc))
        if now >= self.next_sweep:
            self._sweep()
        if self.untold:
            self._tell([])

    # Redis housekeeping

    def _forget(self, wid: str) -> None:
        try:
            departed = asyncio.run(
                self._with_registry(lambda registry: registry.forget_worker(wid))
            )
        except ServiceUnavailable:
            logger.warning("redis unreachable: worker %s is left to the sweep", wid)
            return
        self._tell(departed)

    def _tell(self, departed: list[Departure]) -> None:
        """Have a live worker of this node run the app's `on_departed` for `departed`.

        With no worker ready (a one-worker node whose worker is being respawned), the
        notice waits for the next one that is.
        """
        self.untold += departed
        if not self.untold or self.stopping:
            return
        ready = [c.id for c in self.children.values() if self.scoreboard.is_ready(c.slot)]
        if not ready:
            return
        untold, self.untold = self.untold, []
        try:
            asyncio.run(
                self._with_registry(lambda registry: registry.tell_departures(ready[0], untold))
            )
        except ServiceUnavailable:
            logger.warning(
                "redis unreachable: the rooms of %d departed users are not told", len(untold)
            )

    def _sweep(self) -> None:
        """Remove the state of dead workers, on any node, whose heartbeat expired."""
        self.next_sweep = time.monotonic() + self.config.redis.heartbeat_ttl / 2
        try:
            swept = asyncio.run(self._with_registry(Registry.sweep))
        except ServiceUnavailable:
            logger.debug("redis unreachable; sweep skipped")
            return
        if swept:
            logger.info("swept state of dead workers: %s", ", ".join(swept))
            self._tell([departure for departed in swept.values() for departure in departed])

    async def _with_registry(self, operation: Callable[[Registry], Awaitable[_T]]) -> _T:
        """Run one registry operation on a short-lived client: the master holds no
        connection between turns, so nothing leaks into the workers it forks."""
        client = connect(self.redis_url)
        try:
            return await operation(Registry(client, Keys(self.config.redis.prefix), self.node_id))
        finally:
            await client.close()


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
