"""Fixtures for the tests of the master's control files and commands."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest


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
