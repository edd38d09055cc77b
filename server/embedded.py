"""The embedded Redis: a private `redis-server` on a unix socket, owned by the master.

It keeps nothing on disk and listens on no TCP port. It suits one node; several nodes
must share a Redis of their own (`redis.url`).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from shoal.server.errors import ConfigError, ShoalError

logger = logging.getLogger(__name__)

_START_TIMEOUT = 10.0


class EmbeddedRedis:
    def __init__(self, binary: str) -> None:
        path = shutil.which(binary)
        if path is None:
            raise ConfigError(
                f"redis.url: 'embedded' needs redis-server, but {binary!r} is not on PATH. "
                "Install it (Debian/Ubuntu: apt-get install redis-server) or set redis.url "
                "to a running server, e.g. redis://127.0.0.1:6379/0"
            )
        self.binary = path
        self.directory = Path(tempfile.mkdtemp(prefix="shoal-redis-"))
        self.socket = self.directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def start(self) -> None:
        """Start redis-server and wait until it answers PING.

        Raises:
            ShoalError: it exited or did not answer in time; its log is quoted.
        """
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(log),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            # Its own session: Ctrl-C on the terminal must not stop it before the workers.
            start_new_session=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    if client.ping():
                        logger.info("embedded redis started (pid %d, %s)", self.pid, self.url)
                        return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.stop()
        raise ShoalError(f"embedded redis did not start:\n{tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)
