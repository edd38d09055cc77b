"""Fixtures for the tests of the master's control files and commands: stand-in masters."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import FakeMaster


@pytest.fixture
def fake_master(tmp_path: Path) -> Iterator[Callable[..., FakeMaster]]:
    """Start stand-in masters: `fake_master(*flags, pid_file=..., env=...)`."""
    started: list[FakeMaster] = []

    def start(
        *flags: str, pid_file: Path | None = None, env: dict[str, str] | None = None
    ) -> FakeMaster:
        master = FakeMaster(pid_file or tmp_path / "shoal.pid", *flags, env=env)
        started.append(master)
        return master

    yield start
    for master in started:
        master.kill()


@pytest.fixture
def titled() -> Iterator[Callable[[str], int]]:
    """Start idle processes titled as given (`titled("shoal: master")`); returns the pid."""
    processes: list[subprocess.Popen[str]] = []

    def start(title: str) -> int:
        code = (
            "import setproctitle, sys, time\n"
            f"setproctitle.setproctitle({title!r})\n"
            "print('ready', flush=True)\n"
            "time.sleep(300)\n"
        )
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        processes.append(process)
        return process.pid

    yield start
    for process in processes:
        process.kill()
        process.wait()
