"""shoal as deploy/ ships it: under a real supervisord, the systemd unit as systemd reads
it, and systemd's notify protocol spoken by a real `shoal serve` to a socket the test
binds where systemd's would be."""

from __future__ import annotations

import configparser
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal.config.model import ServerConfig

from support import SCALE, Shoal, client, wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# What the shipped files name, and the test replaces with this checkout's.
SHIPPED_SHOAL = "/opt/shoal/bin/shoal"
SHIPPED_CONFIG = "/etc/shoal/shoal.yaml"
SCRIPTS = Path(sysconfig.get_path("scripts"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path holds at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="shoal-") as directory:
        yield Path(directory)


def seconds(value: str) -> float:
    """A systemd or supervisord duration in seconds ("30s", "30")."""
    return float(value.removesuffix("s"))


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return children + [d for child in children for d in descendants(child)]


def process_group(pgid: int) -> list[int]:
    """Every process in the group, zombies included."""
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


# supervisord


def shipped_supervisord_conf() -> configparser.RawConfigParser:
    # supervisord's own parser is a RawConfigParser; ';' lines are comments to both.
    parser = configparser.RawConfigParser()
    parser.read(DEPLOY / "supervisord.conf")
    return parser


def test_supervisord_conf_stops_shoal_gracefully() -> None:
    """SIGTERM to the master alone, time for server.shutdown_timeout, SIGKILL to the
    group after it, restarts, descriptors for many clients, logs on stdout."""
    conf = shipped_supervisord_conf()
    program = conf["program:shoal"]
    assert program["command"] == f"{SHIPPED_SHOAL} serve --config {SHIPPED_CONFIG}"
    assert program["stopsignal"] == "TERM"
    assert not program.getboolean("stopasgroup")
    assert program.getboolean("killasgroup")
    assert seconds(program["stopwaitsecs"]) > ServerConfig().shutdown_timeout
    assert program.getboolean("autorestart")
    assert program.getboolean("redirect_stderr")
    assert program["stdout_logfile"] == "/dev/stdout"
    assert int(program["stdout_logfile_maxbytes"]) == 0
    assert int(conf["supervisord"]["minfds"]) >= 65536


class Supervisord:
    """A real supervisord running deploy/supervisord.conf as shipped, but for what a
    test must change: where its files go, which shoal and config, who runs it, and a
    descriptor limit this machine allows.
    """

    def __init__(self, directory: Path, shoal_config: Path) -> None:
        conf = shipped_supervisord_conf()
        main, program = conf["supervisord"], conf["program:shoal"]
        main["pidfile"] = str(directory / "supervisord.pid")
        if os.geteuid() != 0:
            del main["user"]
        # supervisord raises its hard limit to minfds, or refuses to start: ask for no
        # more than this machine lets it have.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY:
            main["minfds"] = str(min(int(main["minfds"]), hard))
        conf["unix_http_server"]["file"] = str(directory / "supervisord.sock")
        conf["supervisorctl"]["serverurl"] = f"unix://{directory / 'supervisord.sock'}"
        program["command"] = (
            program["command"]
            .replace(SHIPPED_SHOAL, str(SCRIPTS / "shoal"))
            .replace(SHIPPED_CONFIG, str(shoal_config))
        )
        del program["user"]  # no `shoal` user on a test machine
        self.conf = directory / "supervisord.conf"
        with self.conf.open("w") as out:
            conf.write(out)
        self.log_path = directory / "supervisord.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [SCRIPTS / "supervisord", "--configuration", self.conf],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SCRIPTS / "supervisorctl", "--configuration", self.conf, *args],
            capture_output=True,
            text=True,
            timeout=60 * SCALE,
        )

    def shoal_pid(self) -> int:
        out = self.ctl("pid", "shoal").stdout.strip()
        return int(out) if out.isdigit() else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(45 * SCALE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def test_supervisord_starts_restarts_and_stops_shoal(
    tmp_path: Path, short_dir: Path, settings: dict[str, Any]
) -> None:
    """Under deploy/supervisord.conf, shoal serves; `supervisorctl restart` brings a new
    master that serves; `supervisorctl stop` leaves no process of shoal's behind."""
    # A task pool too: its processes live in a process group of their own.
    node = Shoal(tmp_path, {**settings, "tasks": {"task_worker_num": 1}})
    supervisord = Supervisord(short_dir, node.config_path)
    supervisord.start()
    try:
        first = wait_until(supervisord.shoal_pid, 15, "supervisord to start shoal")
        wait_until(lambda: node.health(expect_ok=True), 15, "shoal under supervisord")
        async with client(node.url("ann")) as ann:
            assert ann.user_id == "ann"
        old = [first, *descendants(first)]
        assert len(old) >= node.workers + 3  # workers, housekeeper, task pool, a task process
        old_groups = {os.getpgid(pid) for pid in old}

        restart = supervisord.ctl("restart", "shoal")
        assert restart.returncode == 0, restart.stdout + restart.stderr
        second = wait_until(supervisord.shoal_pid, 15, "the restarted shoal")
        assert second != first
        for pgid in old_groups:
            assert process_group(pgid) == [], f"process group {pgid} outlived the restart"
        wait_until(lambda: node.health(expect_ok=True), 15, "shoal after the restart")
        async with client(node.url("bo")) as bo:
            assert bo.user_id == "bo"

        current = [second, *descendants(second)]
        groups = {os.getpgid(pid) for pid in current}
        assert second in groups  # supervisord makes the master a process group leader
        stop = supervisord.ctl("stop", "shoal")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert supervisord.shoal_pid() == 0
        for pgid in groups:
            assert process_group(pgid) == [], f"process group {pgid} outlived the stop"
        assert descendants(second) == []
        assert "SIGKILL" not in supervisord.log()
    finally:
        supervisord.stop()


# systemd


def shipped_unit() -> dict[str, list[str]]:
    """deploy/shoal.service's settings, each with every value it is given."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "shoal.service").read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_settings() -> None:
    """Readiness and reloads over sd_notify, a watchdog, a stop that outlasts
    server.shutdown_timeout, a pid file directory, restarts, descriptors."""
    unit = {key: values[-1] for key, values in shipped_unit().items()}
    assert unit["Type"] == "notify"
    assert unit["NotifyAccess"] == "main"
    assert unit["ExecStart"] == f"{SHIPPED_SHOAL} serve --config {SHIPPED_CONFIG}"
    assert unit["ExecReload"] == f"{SHIPPED_SHOAL} reload --config {SHIPPED_CONFIG}"
    assert seconds(unit["WatchdogSec"]) > 0
    assert unit["KillMode"] == "mixed"
    assert seconds(unit["TimeoutStopSec"]) > ServerConfig().shutdown_timeout
    assert unit["RuntimeDirectory"] == "shoal"
    assert unit["Restart"] == "on-failure"
    assert unit["User"] == "shoal"
    assert int(unit["LimitNOFILE"]) >= 65536
    assert unit["NoNewPrivileges"] == "yes"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit, with ExecStart and
    ExecReload pointing at this virtualenv's `shoal` (it checks that they exist)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: deploy/shoal.service is not verified")
    text = (DEPLOY / "shoal.service").read_text()
    unit = tmp_path / "shoal.service"
    unit.write_text(text.replace(SHIPPED_SHOAL, str(SCRIPTS / "shoal")))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    report = out.stdout + out.stderr
    # Unknown keys and bad values are only warnings (exit status 0): any line about the
    # unit fails the test. Lines about the system's own units are not shoal's business.
    assert out.returncode == 0, report
    assert [line for line in report.splitlines() if "shoal.service" in line] == [], report


# sd_notify, end to end


@dataclass(frozen=True, slots=True)
class Notification:
    pid: int
    fields: dict[str, str]
    at: float  # CLOCK_MONOTONIC, microseconds, when the test read it


class NotifySocket:
    """An AF_UNIX datagram socket bound where systemd's NOTIFY_SOCKET would be, which
    learns each sender's pid from the kernel (SO_PASSCRED), as systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(str(path))
        self.received: list[Notification] = []

    def _read(self, timeout: float) -> None:
        self.socket.settimeout(timeout)
        credentials = struct.Struct("3i")  # struct ucred: pid, uid, gid
        try:
            data, ancillary, _, _ = self.socket.recvmsg(4096, socket.CMSG_SPACE(credentials.size))
        except TimeoutError:
            return
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = credentials.unpack(payload[: credentials.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.received.append(Notification(pid, fields, now))

    def wait_for(self, field: str, after: int = 0, timeout: float = 15) -> int:
        """The index in `received` of the first notification from index `after` on that
        carries `field`, reading until one does."""
        deadline = time.monotonic() + timeout * SCALE
        index = after
        while True:
            while index < len(self.received):
                if field in self.received[index].fields:
                    return index
                index += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [n.fields for n in self.received[after:]]
                raise AssertionError(f"no {field}= after {timeout * SCALE:.1f}s; got {seen}")
            self._read(min(remaining, 0.5))

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(short_dir / "notify")
    yield sock
    sock.close()


async def test_notify_ready_reloading_stopping(
    tmp_path: Path, settings: dict[str, Any], notify_socket: NotifySocket
) -> None:
    """READY=1 when every worker listens, STATUS= lines, RELOADING=1 (with
    MONOTONIC_USEC) and READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM; every
    notification from the master itself, as systemd's NotifyAccess=main requires."""
    node = Shoal(tmp_path, settings)
    node.start(wait=False, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    try:
        ready = notify_socket.wait_for("READY")
        assert notify_socket.received[ready].fields["READY"] == "1"
        # At READY=1, at once: every worker is up, and a client is served.
        assert node.health(expect_ok=True) is not None, node.health()
        async with client(node.url("ann")) as ann:
            assert ann.user_id == "ann"
        status = notify_socket.wait_for("STATUS")
        assert notify_socket.received[status].fields["STATUS"].strip()

        mark = len(notify_socket.received)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        node.signal(signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING", mark)
        fields = notify_socket.received[reloading].fields
        assert fields["RELOADING"] == "1"
        # systemd 253+ matches the reload by the sender's CLOCK_MONOTONIC, in µs.
        assert before <= int(fields["MONOTONIC_USEC"]) <= notify_socket.received[reloading].at
        reloaded = notify_socket.wait_for("READY", reloading + 1, timeout=30)
        assert notify_socket.received[reloaded].fields["READY"] == "1"
        assert node.health(expect_ok=True) is not None, node.health()
        async with client(node.url("bo")) as bo:
            assert bo.user_id == "bo"

        mark = len(notify_socket.received)
        node.signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING", mark)
        assert notify_socket.received[stopping].fields["STOPPING"] == "1"
        assert node.wait(20) == 0
    finally:
        node.stop()
    assert {n.pid for n in notify_socket.received} == {node.pid}


async def test_notify_watchdog_pings(
    tmp_path: Path, settings: dict[str, Any], notify_socket: NotifySocket
) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 comes every half interval."""
    node = Shoal(tmp_path, settings)
    node.start(
        wait=False,
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000"},
    )
    try:
        ping = notify_socket.wait_for("WATCHDOG")
        for _ in range(3):
            ping = notify_socket.wait_for("WATCHDOG", ping + 1, timeout=2)
        assert notify_socket.received[ping].fields["WATCHDOG"] == "1"
    finally:
        node.stop()
    assert {n.pid for n in notify_socket.received} == {node.pid}
