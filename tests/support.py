"""Test support: real Redis servers, real `shoal serve` processes, plain websockets clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame
from websockets.streams import StreamReader

from shoal.core import schema

# Every timeout in the tests is a multiple of this, so slow machines can stretch them.
SCALE = float(os.environ.get("SHOALTEST_TIMEOUT_SCALE", "1"))
SHOAL = [sys.executable, "-m", "shoal.server.cli"]
# Redis timings short enough that sweeps and failure detection fit in a test, in the
# order the config requires (stall < socket, socket + health check < heartbeat ttl).
FAST_REDIS = {
    "heartbeat_ttl": 3,
    "stall_timeout": 0.5,
    "socket_timeout": 1.5,
    "health_check_interval": 1,
}


# Per-connection rate limits lifted (`limits.*`), for tests of other mechanisms that
# need one client to send faster than the defaults allow (floods of the output buffer, the
# inbox, the inflation budget).
UNLIMITED = {"messages_per_second": None, "bytes_per_second": None}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout * SCALE
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.1f}s waiting for {what}")
        time.sleep(interval)


async def eventually(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """`wait_until` for async predicates, without blocking the loop."""
    deadline = time.monotonic() + timeout * SCALE
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


class RedisServer:
    """A private redis-server on a free port, which tests may stop and start again."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: run ./dev test, which installs it")
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="shoal-test-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def start(self, *extra: str, wait: bool = True) -> None:
        """Start it; `extra` are more redis-server options (e.g. "--key-load-delay", "100").

        With `wait`, return once it answers PING (not while it is still loading).
        """
        assert self.binary is not None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        if wait:
            wait_until(self.answers, 10, "redis-server to start")

    def answers(self) -> bool:
        """Whether it answers PING now (False while down, frozen, loading or busy)."""
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5) as probe:
                return bool(probe.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.thaw()
            self.process.kill()
            self.process.wait()
            self.process = None

    def freeze(self) -> None:
        """SIGSTOP: Redis hangs with its connections open, as a stuck server does."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class BlackholeProxy:
    """A TCP proxy to a local port, in a thread of its own, that can drop every byte of
    the connections it holds without closing them: what a NAT or load balancer that
    forgot a connection, or a failover without RST, leaves a client with (a half-open
    connection). New connections are forwarded normally, except between `cut()` and
    `mend()`: a network that is down.

    A thread, not the test's loop: tests block their loop in `wait_until`, and the
    proxy must keep forwarding meanwhile.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.dropping: set[asyncio.Event] = set()
        self.links: list[asyncio.Event] = []
        self.accepted = 0
        self.down = False  # set from the test's thread: one attribute, which the GIL keeps whole
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = int(server.sockets[0].getsockname()[1])
            ready.set()
            async with server:
                await server.serve_forever()

        self.main = self.loop.create_task(serve())
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.main)
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.down:  # nothing answers: the bytes go nowhere, until the client gives up
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
            writer.close()
            return
        drop = asyncio.Event()
        self.links.append(drop)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not drop.is_set():
                        dst.write(data)
                        await dst.drain()
            if not drop.is_set():
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def blackhole(self) -> int:
        """Drop everything on the connections open now; return how many there were."""
        links = list(self.links)
        for drop in links:
            self.loop.call_soon_threadsafe(drop.set)
        return len(links)

    def cut(self) -> int:
        """The network goes down: drop everything on the connections open now (as
        `blackhole()`), and take every new one in without an answer until `mend()`."""
        self.down = True
        return self.blackhole()

    def mend(self) -> None:
        """The network is back: new connections are forwarded (those cut stay dead)."""
        self.down = False

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.main.cancel)
        self.thread.join(5)


class Shoal:
    """One `shoal serve` process (a node), configured from a dict."""

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        self.port = free_port()
        settings = {**settings, "server": {"port": self.port, **settings.get("server", {})}}
        settings["server"].setdefault("host", "127.0.0.1")
        # The admin listener answers the details of /healthz and the metrics.
        settings["server"].setdefault("admin_port", free_port())
        self.admin_port: int | None = settings["server"]["admin_port"]
        self.workers = int(settings["server"].setdefault("worker_num", 2))
        self.settings = settings
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / f"shoal-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.log_path = directory / f"shoal-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(
        self,
        *,
        wait: bool = True,
        app_path: Path | None = None,
        wrapper: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        nofile: int | None = None,
    ) -> Shoal:
        """Run `shoal serve`; with `wait`, return once every worker is up.

        Args:
            app_path: a folder to import applications from (PYTHONPATH).
            wrapper: a command to run shoal under (e.g. `unshare ...`).
            env: variables to add to the test's environment (e.g. NOTIFY_SOCKET).
            nofile: the soft open-files limit to start it with (the hard limit is kept).
        """
        env = {**os.environ, **(env or {})}
        if app_path is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(app_path), env.get("PYTHONPATH")])
            )
        limit = None if nofile is None else functools.partial(_limit_open_files, nofile)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*wrapper, *SHOAL, "serve", "--config", str(self.config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Safe beside threads: the child calls setrlimit alone, which takes no lock.
                preexec_fn=limit,  # noqa: PLW1509
            )
        if wait:
            wait_until(lambda: self.health(expect_ok=True), 15, f"shoal on :{self.port}")
        return self

    def url(self, user: str | None = None, path: str = "/ws") -> str:
        query = f"?user_id={user}" if user else ""
        return f"ws://127.0.0.1:{self.port}{path}{query}"

    def health(self, *, expect_ok: bool = False) -> dict[str, Any] | None:
        """GET /healthz of the admin listener, with the node's details; None unless it
        answers (200 and all workers up, with expect_ok)."""
        try:
            with urllib.request.urlopen(f"{self.admin_url}/healthz", timeout=2) as r:
                body: dict[str, Any] = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if expect_ok:
                return None
            body = json.loads(exc.read())
            body["http_status"] = exc.code
            return body
        except OSError:
            return None
        body["http_status"] = 200
        if expect_ok and body["workers_alive"] != self.workers:
            return None
        return body

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None, "this node has no admin listener"
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def worker_pids(self) -> list[int]:
        """The WebSocket workers: children titled `shoal: worker N`."""
        return [p for p in self.child_pids() if _cmdline(p).startswith("shoal: worker")]

    def housekeeper_pid(self) -> int:
        (pid,) = [p for p in self.child_pids() if _cmdline(p).startswith("shoal: housekeeper")]
        return pid

    def task_pool_pid(self) -> int | None:
        pids = [p for p in self.child_pids() if _cmdline(p).startswith("shoal: task pool")]
        return pids[0] if len(pids) == 1 else None

    def redis_pid(self) -> int:
        """The embedded Redis."""
        (pid,) = [p for p in self.child_pids() if "redis-server" in _cmdline(p)]
        return pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout * SCALE)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15 * SCALE)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait()


def _limit_open_files(soft: int) -> None:
    """Set this process's soft open-files limit, keeping its hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# (sample name, its label's value or ""): the value.
Samples = dict[tuple[str, str], float]


def workers_replaced(node: Shoal, old: set[int]) -> set[int] | None:
    """The worker pids once none of `old` is left and every slot serves again."""
    pids = set(node.worker_pids())
    if pids & old or len(pids) != node.workers or node.health(expect_ok=True) is None:
        return None
    return pids


def scrape(node: Shoal, path: str = "/metrics") -> Samples:
    """GET the metrics page of `node` (whichever worker answers, on the admin listener)
    and parse it."""
    url = f"{node.admin_url}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            (label,) = sample.labels.values() or ("",)
            samples[sample.name, label] = sample.value
    return samples


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # it just exited


FAKE_MASTER = Path(__file__).parent / "server" / "fake_master.py"


class FakeMaster:
    """A stand-in for the master (tests/server/fake_master.py), for the tests of `shoal
    reload|stop|status`: its process, pid file and what it printed."""

    def __init__(self, pid_file: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.pid_file = pid_file
        self.process = subprocess.Popen(
            [sys.executable, str(FAKE_MASTER), str(pid_file), *flags],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        # It prints `ready` once its pid and status files are written.
        assert self.process.stdout.readline() == "ready\n"

    @property
    def pid(self) -> int:
        return self.process.pid

    def finish(self) -> tuple[int, list[str]]:
        """Wait for it to exit: its exit status and the signals it handled."""
        out, _ = self.process.communicate(timeout=10 * SCALE)
        return self.process.returncode, out.split()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def upgrade_request(path: str) -> bytes:
    """A WebSocket upgrade request for `path`, as a hand-made client sends it."""
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )


def masked_frame(payload: bytes) -> bytes:
    """One client text frame (masked, as RFC 6455 requires of clients)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    elif length < 65536:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def websockets_frames(wire: bytes, max_size: int) -> list[tuple[Frame, int]]:
    """The frames websockets' own parser reads from the start of `wire` (as a server: masked
    frames only, at most `max_size` bytes), with the offset after each, up to the first
    frame it cannot read whole or refuses."""
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    frames: list[tuple[Frame, int]] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=True, max_size=max_size)
        try:
            next(parser)
        except StopIteration as done:
            frames.append((done.value, len(wire) - len(reader.buffer)))
        except Exception:  # cut short (EOFError) or refused: the stream ends there
            break
    return frames


def pipelined_hello(port: int, path: str) -> bytes:
    """Send an upgrade request and a `{"type":"hello"}` frame in one packet, as a client
    that does not wait for the 101 does; return what came back until its echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=5 * SCALE) as sock:
        sock.sendall(upgrade_request(path) + masked_frame(b'{"type":"hello"}'))
        data = b""
        with contextlib.suppress(TimeoutError):
            while b'"echo"' not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    return data


class Client:
    """A plain `websockets` client speaking JSON: independent of shoal's own code."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    @property
    def user_id(self) -> str:
        return str(self.welcome["user_id"])

    @property
    def connection_id(self) -> str:
        return str(self.welcome["connection_id"])

    @property
    def worker(self) -> str:
        return self.connection_id.rsplit(".", 1)[0]

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        """The next message, decoded with the standard library's own JSON parser.

        A message of a type the chat protocol defines must match `shoal.core.schema`
        exactly (no missing, extra or mistyped field), so every end-to-end test checks
        the schema too; other types (custom applications) are returned as they are.
        """
        async with asyncio.timeout(timeout * SCALE):
            raw = await self.ws.recv()
        result: dict[str, Any] = json.loads(raw)
        if isinstance(result, dict) and result.get("type") in schema.SERVER_TYPES:
            schema.check_server_message(result)
        return result

    async def expect(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        message = await self.recv(timeout)
        assert message["type"] == kind, message
        return message

    async def request(self, message: dict[str, Any], reply: str) -> dict[str, Any]:
        await self.send(message)
        return await self.expect(reply)

    async def silent(self, seconds: float = 0.3) -> None:
        """Assert nothing arrives for a while."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds * SCALE):
                message = await self.ws.recv()
                raise AssertionError(f"unexpected message: {message!r}")


async def join(room: str, *members: Client) -> None:
    """Each of `members` joins `room` in turn; the ones already in it read the
    `user_joined_room` of each that follows, so that nothing is left unread.

    A member may also get the notice of one that joined just before it: a room message
    published before a join's reply can reach the joiner after it, when its worker reads
    the join's Redis replies before the bus (live delivery promises nothing before the
    reply). Such notices are read and skipped."""
    for n, member in enumerate(members):
        await member.request({"type": "join_room", "room": room}, "joined_room")
        for earlier in members[:n]:
            while (await earlier.expect("user_joined_room"))["user_id"] != member.user_id:
                pass


@contextlib.asynccontextmanager
async def client(url: str, *, welcome: str | None = "welcome") -> AsyncIterator[Client]:
    """A connected client; it first waits for a message of type `welcome` (None: none)."""
    async with connect(url, open_timeout=10 * SCALE, close_timeout=2) as ws:
        c = Client(ws)
        if welcome:
            c.welcome = await c.expect(welcome)
        yield c


@contextlib.asynccontextmanager
async def clients_on_workers(
    shoal: Shoal, users: list[str], workers: int = 2, *, welcome: str = "welcome"
) -> AsyncIterator[list[Client]]:
    """One client per user, arranged so that they do not all land on one worker.

    SO_REUSEPORT spreads connections by a hash of the address pair, so the helper opens
    spare connections until the users are spread over `workers` workers.
    """
    async with contextlib.AsyncExitStack() as stack:
        chosen: list[Client] = []
        seen: set[str] = set()
        for _ in range(200):
            user = users[len(chosen)]
            c = await stack.enter_async_context(client(shoal.url(user), welcome=welcome))
            remaining = len(users) - len(chosen)
            missing = workers - len(seen)
            if c.worker in seen and missing >= remaining:
                await c.ws.close()
                continue
            chosen.append(c)
            seen.add(c.worker)
            if len(chosen) == len(users):
                break
        else:  # pragma: no cover - SO_REUSEPORT would have to be broken
            raise AssertionError(f"clients never spread over {workers} workers")
        yield chosen
