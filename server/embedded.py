"""The embedded Redis: a private `redis-server` on a unix socket, a child of the master.

It keeps nothing on disk and listens on no TCP port. It suits one node; several nodes
must share a Redis of their own (`redis.url`).

The master supervises it like its other children (`shoal.server.supervisor`): it is
started first, stopped last, and started again if it dies. Only the first start waits
for it to answer; a restart does not block the master, and the workers reconnect when
it is up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import redis

from shoal.core.errors import ConfigError, ShoalError

logger = logging.getLogger(__name__)

_START_TIMEOUT = 10.0
_MB = 1024 * 1024


def pubsub_limit(subscriber_backlog: int) -> str:
    """Redis's `client-output-buffer-limit` for pub/sub connections, from
    `limits.subscriber_backlog`: "pubsub HARD SOFT SECONDS".

    Publishers wait while a subscriber's backlog is above `subscriber_backlog`
    (`shoal.core.bus`), so Redis should never need its limit; it stays as the bound on
    a subscriber that stops reading altogether (a frozen worker, whose publishers give
    up waiting after `redis.socket_timeout`). The soft limit is 4 times the backlog (at
    least 32 MB) for 30 s, well past what pacing lets through; the hard limit twice
    that. Redis's own default, 32 MB hard and 8 MB for 60 s, leaves too little margin
    over a 4 MB bound for bursts of large messages.
    """
    soft = max(32 * _MB, 4 * subscriber_backlog)
    return f"pubsub {2 * soft} {soft} 30"


class EmbeddedRedis:
    def __init__(self, binary: str, subscriber_backlog: int = 4 * _MB) -> None:
        path = shutil.which(binary)
        if path is None:
            raise ConfigError(
                f"redis.url: 'embedded' needs redis-server, but {binary!r} is not on PATH. "
                "Install it (Debian/Ubuntu: apt-get install redis-server) or set redis.url "
                "to a running server, e.g. redis://127.0.0.1:6379/0"
            )
        self.binary = path
        self.subscriber_backlog = subscriber_backlog
        self.directory = Path(tempfile.mkdtemp(prefix="shoal-redis-"))
        self.socket = self.directory / "redis.sock"
        self.log = self.directory / "redis.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def spawn(self) -> int:
        """Start redis-server; return its pid. The caller reaps it."""
        argv = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--daemonize", "no",
            "--client-output-buffer-limit", pubsub_limit(self.subscriber_backlog),
        ]  # fmt: skip
        return os.posix_spawn(
            self.binary,
            argv,
            os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
            # Its own session: Ctrl-C on the terminal must not stop it before the workers.
            setsid=True,
        )

    def wait_ready(self, pid: int) -> None:
        """Wait until the Redis started as `pid` answers PING (its first start only).

        Raises:
            ShoalError: it exited or did not answer in time; its log is quoted.
        """
        deadline = time.monotonic() + _START_TIMEOUT
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                try:
                    if client.ping():
                        logger.info("embedded redis started (pid %d, %s)", pid, self.url)
                        return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        finally:
            client.close()
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise ShoalError(f"embedded redis did not start:\n{tail}")

    def cleanup(self) -> None:
        """Remove its directory, once it has exited."""
        shutil.rmtree(self.directory, ignore_errors=True)
