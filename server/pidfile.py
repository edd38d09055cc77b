"""The master's pid file: where it is, written once at start, removed on exit.

`shoal reload`, `stop` and `status` find the master through it. It holds the master's
pid and a newline. The master refuses to start while the file names a live shoal master
(two masters would fight over one file); a file left by a master that is gone, or whose
pid now belongs to another program, is replaced with a warning.

A process is a shoal master when its title (`/proc/<pid>/cmdline`, which
`setproctitle` rewrites) starts with `shoal: master`; a zombie, exited but not yet reaped,
has an empty command line and is not.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from shoal.config.model import ServerConfig
from shoal.core.errors import AlreadyRunning, NotRunning, ShoalError
from shoal.server.files import write_atomic

logger = logging.getLogger(__name__)

MASTER_TITLE = b"shoal: master"


def resolve(
    server: ServerConfig, environ: Mapping[str, str] | None = None, *, name: str = "shoal"
) -> Path:
    """Where the master of `server` writes its pid file, and where the CLI reads it.

    `server.pid_file` when set; otherwise `shoal-<port>.pid` in `$XDG_RUNTIME_DIR` when
    that names a directory (a per-user tmpfs under systemd), else in the temporary
    directory (`tempfile.gettempdir()`). The port in the name keeps servers on different
    ports apart.

    Args:
        environ: where to read `XDG_RUNTIME_DIR` (default `os.environ`).
        name: the default file's stem: `shoal-tasks` for a task pool alone (`shoal
            tasks`), so that it does not take the pid file of a server on the same port.
    """
    if server.pid_file is not None:
        return Path(server.pid_file)
    runtime = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR", "")
    directory = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    return Path(directory) / f"{name}-{server.port}.pid"


def is_master(pid: int) -> bool:
    """Whether `pid` is a live shoal master (not a zombie, not another program)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone, or hidden from this user (/proc mounted with hidepid)
    return title.startswith(MASTER_TITLE)


def read(path: Path) -> int:
    """The pid of the running master that `path` names.

    Raises:
        NotRunning: there is no file, it holds no pid, or its pid is not a running
            shoal master (a stale file); the message says which, and what to do.
        ShoalError: the file exists but cannot be read.
    """
    try:
        pid = _read_pid(path)
    except FileNotFoundError as exc:
        raise NotRunning(f"no pid file at {path}: is shoal running? (server.pid_file)") from exc
    except ValueError as exc:
        raise NotRunning(f"pid file {path} does not hold a pid: {exc}") from exc
    except OSError as exc:
        raise ShoalError(f"cannot read pid file {path}: {exc.strerror}") from exc
    if not is_master(pid):
        raise NotRunning(
            f"stale pid file {path}: process {pid} is not a running shoal master "
            "(shoal stopped without removing it); remove the file"
        )
    return pid


class PidFile:
    """The pid file of this process, the master: `acquire` at start, `release` on exit.

    As a context manager, it acquires on entry and releases on exit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid: int | None = None

    def acquire(self) -> None:
        """Write this process's pid to the file, creating its directory.

        Call it once the process title is `shoal: master` (`shoal.core.logs.set_role`)
        and before forking. A file that names a process other than a live shoal master
        is stale: it is replaced, with a warning.

        Raises:
            AlreadyRunning: the file names a live shoal master.
            ShoalError: the file cannot be written.
        """
        pid = os.getpid()
        try:
            other: int | None = _read_pid(self.path)
        except FileNotFoundError:
            other = None
        except (OSError, ValueError) as exc:
            logger.warning("replacing unreadable pid file %s: %s", self.path, exc)
            other = None
        if other is not None and other != pid:
            if is_master(other):
                raise AlreadyRunning(
                    f"server.pid_file: {self.path} names pid {other}, a running shoal "
                    "master: stop it first (shoal stop), or give this server another "
                    "server.port or server.pid_file"
                )
            logger.warning(
                "replacing stale pid file %s: process %d is not a running shoal master",
                self.path,
                other,
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, f"{pid}\n".encode())
        except OSError as exc:
            raise ShoalError(f"server.pid_file: cannot write {self.path}: {exc.strerror}") from exc
        self.pid = pid

    def release(self) -> None:
        """Remove the file if it still names this process.

        A file another master has written since (after this one was taken for dead) is
        left alone; in a forked child, which inherited this object, it does nothing.
        """
        if self.pid is None or self.pid != os.getpid():
            return
        try:
            if _read_pid(self.path) == self.pid:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # already gone, or no longer ours
        self.pid = None

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(path: Path) -> int:
    """The pid in `path`. Raises OSError, or ValueError for content that is no pid."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{text[:40]!r} is not a process id")
    return int(text)
