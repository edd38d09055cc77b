"""The sd_notify protocol against real AF_UNIX datagram sockets, at a path and abstract."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.server.notify import Notifier


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path holds at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="shoal-") as directory:
        yield Path(directory)


def bound(address: str | bytes) -> socket.socket:
    """A datagram socket bound where systemd's would be, with a receive timeout."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    return receiver


def received(receiver: socket.socket) -> str:
    return receiver.recv(4096).decode()


def test_without_notify_socket_it_does_nothing() -> None:
    environ: dict[str, str] = {}
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.reloading()
    notifier.status("serving")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_every_notification_reaches_a_socket_at_a_path(short_dir: Path) -> None:
    path = short_dir / "notify"
    with bound(str(path)) as receiver:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        notifier.status("4 workers starting")
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
        notifier.close()
        assert [received(receiver) for _ in range(4)] == [
            "STATUS=4 workers starting",
            "READY=1",
            "WATCHDOG=1",
            "STOPPING=1",
        ]


def test_an_abstract_socket_is_written_with_an_at_sign() -> None:
    name = f"shoal-test-{uuid.uuid4().hex}"
    with bound(b"\0" + name.encode()) as receiver:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"})
        notifier.ready()
        notifier.close()
        assert received(receiver) == "READY=1"


def test_reloading_carries_the_monotonic_clock_in_microseconds(short_dir: Path) -> None:
    """systemd 253+ matches RELOADING=1 to a reload by MONOTONIC_USEC (CLOCK_MONOTONIC)."""
    path = short_dir / "notify"
    with bound(str(path)) as receiver:
        notifier = Notifier(str(path))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.ready()
        notifier.close()
        reloading, ready = received(receiver), received(receiver)
    fields = dict(line.split("=", 1) for line in reloading.split("\n"))
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert ready == "READY=1"


def test_a_status_stays_on_one_line(short_dir: Path) -> None:
    """A newline would end the STATUS field and start a field of its own."""
    path = short_dir / "notify"
    with bound(str(path)) as receiver:
        notifier = Notifier(str(path))
        notifier.status("reloading\nREADY=1")
        notifier.close()
        assert received(receiver) == "STATUS=reloading READY=1"


def test_the_variables_leave_the_environment_so_children_cannot_notify(
    monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environ()
    notifier.close()
    assert notifier.watchdog_interval == 4.0
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    # Unset in the process's own environment too, not only in Python's copy of it.
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if "
         "k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')))"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert child.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        # The watchdog is another process's: the one systemd started, not this child.
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "shoal"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_the_watchdog_interval_honours_watchdog_pid(
    environ: dict[str, str], interval: float | None
) -> None:
    environ = dict(environ)
    notifier = Notifier.from_environ(environ)
    assert notifier.watchdog_interval == interval
    assert environ == {}


def test_sending_to_a_vanished_manager_does_not_raise(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_dir / "notify"
    with bound(str(path)):
        notifier = Notifier(str(path))
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="shoal.server.notify"):
        notifier.ready()
        notifier.stopping()
    notifier.close()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]
    assert "READY=1" in caplog.records[0].getMessage()


def test_an_address_that_is_no_unix_socket_turns_notifications_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.server.notify"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()
    assert "not a unix socket path" in caplog.text
