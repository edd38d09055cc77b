"""The master's pid file: where it lies, live and stale owners, removal on exit."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shoal.config.model import ServerConfig
from shoal.core.errors import AlreadyRunning, NotRunning
from shoal.server import pidfile
from shoal.server.pidfile import PidFile

from support import wait_until


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_resolve_uses_the_configured_path() -> None:
    server = ServerConfig(port=9600, pid_file="/srv/run/shoal.pid")
    assert pidfile.resolve(server, {"XDG_RUNTIME_DIR": "/"}) == Path("/srv/run/shoal.pid")


def test_resolve_defaults_to_the_runtime_directory_by_port(tmp_path: Path) -> None:
    environ = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert pidfile.resolve(ServerConfig(), environ) == tmp_path / "shoal-9501.pid"
    assert pidfile.resolve(ServerConfig(port=9600), environ) == tmp_path / "shoal-9600.pid"


@pytest.mark.parametrize("runtime", [None, "", "/nonexistent/run"])
def test_resolve_falls_back_to_the_temporary_directory(runtime: str | None) -> None:
    environ = {} if runtime is None else {"XDG_RUNTIME_DIR": runtime}
    expected = Path(tempfile.gettempdir()) / "shoal-9501.pid"
    assert pidfile.resolve(ServerConfig(), environ) == expected


def test_acquire_writes_the_pid_and_release_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "shoal" / "shoal.pid"
    with PidFile(path) as owned:
        assert path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert owned.pid == os.getpid()
        assert [p.name for p in path.parent.iterdir()] == ["shoal.pid"]  # no temporary file
    assert not path.exists()


def test_a_live_master_keeps_its_pid_file(tmp_path: Path, titled: Callable[[str], int]) -> None:
    master = titled("shoal: master")
    path = tmp_path / "shoal.pid"
    path.write_text(f"{master}\n")
    with pytest.raises(AlreadyRunning, match=rf"names pid {master}, a running shoal master"):
        PidFile(path).acquire()
    assert path.read_text() == f"{master}\n"
    assert pidfile.read(path) == master


def stale_pids(titled: Callable[[str], int]) -> dict[str, str]:
    """Contents of stale pid files: a pid that is gone, one that another program has."""
    return {
        "gone": str(dead_pid()),
        "another program": str(titled("shoal: worker 0")),
        "not a pid": "shoal",
    }


@pytest.mark.parametrize("case", ["gone", "another program", "not a pid"])
def test_a_stale_pid_file_is_replaced_with_a_warning(
    case: str,
    tmp_path: Path,
    titled: Callable[[str], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "shoal.pid"
    path.write_text(stale_pids(titled)[case] + "\n")
    with caplog.at_level(logging.WARNING, logger="shoal.server.pidfile"), PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n"
    assert "replacing" in caplog.text and str(path) in caplog.text
    assert not path.exists()


def test_a_pid_file_left_by_this_process_is_taken_over(tmp_path: Path) -> None:
    """PID 1 in a container restarts with the pid it had: its old file is no obstacle."""
    path = tmp_path / "shoal.pid"
    path.write_text(f"{os.getpid()}\n")
    with PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_release_leaves_a_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "shoal.pid"
    owned = PidFile(path)
    owned.acquire()
    path.write_text("4242\n")  # another master took it over
    owned.release()
    assert path.read_text() == "4242\n"


def test_release_in_a_forked_child_does_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shoal.pid"
    with PidFile(path) as owned:
        child = os.fork()
        if child == 0:
            owned.release()
            os._exit(0)
        os.waitpid(child, 0)
        assert path.read_text() == f"{os.getpid()}\n"


def test_read_explains_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "shoal-9501.pid"
    with pytest.raises(NotRunning) as error:
        pidfile.read(path)
    assert str(error.value) == (f"no pid file at {path}: is shoal running? (server.pid_file)")


def test_read_explains_a_stale_file(tmp_path: Path, titled: Callable[[str], int]) -> None:
    path = tmp_path / "shoal.pid"
    for content in stale_pids(titled).values():
        path.write_text(content)
        with pytest.raises(NotRunning, match=r"stale pid file|does not hold a pid"):
            pidfile.read(path)


def test_an_exited_master_is_not_a_master_before_it_is_reaped(
    titled: Callable[[str], int],
) -> None:
    """A zombie holds its pid until its parent waits for it; `shoal stop` must not wait
    for that parent."""
    master = titled("shoal: master")
    assert pidfile.is_master(master)
    os.kill(master, signal.SIGKILL)
    wait_until(lambda: not pidfile.is_master(master), 5, "the killed master to be a zombie")
    assert Path(f"/proc/{master}").exists()  # not reaped yet: the fixture reaps it
