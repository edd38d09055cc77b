"""permessage-deflate under attack: small frames that inflate a thousandfold.

The flooder speaks through websockets' own sans-I/O client (handshake, compression,
framing) and writes one pre-built frame over and over on a plain socket, so that the
test process spends nothing on compressing it: the figures are the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # ships no type information
import pytest
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from support import SCALE, UNLIMITED, Client, Shoal, client, wait_until

MIB = 1024 * 1024
# The flood: 1,063-byte frames that inflate to 1 MiB, sent at 250 KB/s.
FLOOD_RATE = 250_000
FLOOD_SECONDS = 6.0
INFLATE_RATE = 4 * MIB  # server.websocket_inflate_rate's default


def _bomb(size: int) -> bytes:
    """A JSON `ping` of `size` bytes, nearly all one repeated letter: about 1,060 bytes
    once deflated, and echoed back whole by the chat app."""
    head = b'{"type":"ping","data":"'
    return head + b"a" * (size - len(head) - 2) + b'"}'


class RawClient:
    """A compressed connection driven by websockets' sans-I/O client on a plain socket.

    `frame(payload)` compresses a message once; the same bytes may then be written any
    number of times (no context takeover: each message is compressed on its own).
    """

    def __init__(self, port: int, user: str) -> None:
        self.protocol = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws?user_id={user}"),
            extensions=[
                ClientPerMessageDeflateFactory(
                    client_no_context_takeover=True,
                    compress_settings={"level": 9, "memLevel": 9},
                )
            ],
            max_size=None,
        )
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE)
        self.request = self.protocol.connect()
        self.messages: list[tuple[float, str | bytes]] = []
        self.closed: Frame | None = None

    def handshake(self) -> None:
        self.protocol.send_request(self.request)
        self.sock.sendall(b"".join(self.protocol.data_to_send()))
        while self.protocol.handshake_exc is None and not self.protocol.extensions:
            self._read(self.sock.recv(65536))
        assert self.protocol.extensions, self.protocol.handshake_exc

    def frame(self, payload: bytes) -> bytes:
        self.protocol.send_text(payload)
        return b"".join(self.protocol.data_to_send())

    def _read(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.CLOSE:
                    self.closed = event
                elif event.opcode is Opcode.TEXT:
                    self.messages.append((time.monotonic(), bytes(event.data).decode()))

    def read_in_background(self) -> threading.Thread:
        def read() -> None:
            with contextlib.suppress(OSError):
                while data := self.sock.recv(1 << 20):
                    self._read(data)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def compressing_node(tmp_path: Path, settings: dict[str, Any]) -> Iterator[Shoal]:
    settings["server"]["websocket_compression"] = True
    settings["limits"] = dict(UNLIMITED)  # the inflation budget is under test, not the rates
    node = Shoal(tmp_path, settings).start()
    try:
        yield node
    finally:
        node.stop()


def _worker_of(connection_id: str) -> str:
    return connection_id.rsplit(".", 1)[0]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def test_a_flood_of_small_compressed_frames_only_slows_its_sender(
    tmp_path: Path, settings: dict[str, Any], record_property: Callable[[str, object], None]
) -> None:
    """Before: the worker inflated every frame of a read at once and kept the messages
    until the read was handled; its other clients waited 2.5 s per round trip, it grew
    by 245 MB, and its state in Redis was swept as dead while it served clients."""
    with compressing_node(tmp_path, settings) as node:
        flooder = RawClient(node.port, "flooder")
        flooder.handshake()
        flooder.read_in_background()
        wait_until(lambda: flooder.messages, 5, "the flooder's welcome")
        worker = _worker_of(json.loads(flooder.messages[0][1])["connection_id"])
        frame = flooder.frame(_bomb(MIB - 64))
        assert len(frame) < 1100  # a frame of the size
        async with contextlib.AsyncExitStack() as stack:
            victims: list[Client] = []
            for n in range(60):
                victim = await stack.enter_async_context(client(node.url(f"v{n}")))
                assert victim.ws.protocol.extensions  # compressed too
                if victim.worker == worker:
                    victims.append(victim)
                    if len(victims) == 3:
                        break
                else:
                    await victim.ws.close()
            assert len(victims) == 3, "no three clients on the flooder's worker"
            pids = node.worker_pids()
            (process,) = [psutil.Process(pid) for pid in pids if worker.endswith(f".{pid}")]
            rss_before = process.memory_info().rss
            cpu_before = process.cpu_times()

            round_trips: list[float] = []
            flooding = True

            async def measure(victim: Client) -> None:
                n = 0
                while flooding:
                    n += 1
                    sent = time.monotonic()
                    await victim.send({"type": "ping", "n": n})
                    echo = await victim.expect("echo", timeout=60)
                    assert echo["data"]["n"] == n
                    round_trips.append(time.monotonic() - sent)
                    await asyncio.sleep(0.05)

            def flood() -> int:
                started, written = time.monotonic(), 0
                while (elapsed := time.monotonic() - started) < FLOOD_SECONDS:
                    ahead = written / FLOOD_RATE - elapsed
                    if ahead > 0:
                        time.sleep(ahead)
                    flooder.sock.sendall(frame)
                    written += len(frame)
                return written

            measuring = [asyncio.create_task(measure(victim)) for victim in victims]
            started = time.monotonic()
            flooding_thread = asyncio.get_running_loop().run_in_executor(None, flood)
            rss_peak = rss_before
            while not flooding_thread.done():
                rss_peak = max(rss_peak, process.memory_info().rss)
                await asyncio.sleep(0.1)
            written = await flooding_thread
            elapsed = time.monotonic() - started
            cpu_after = process.cpu_times()
            flooding = False
            await asyncio.gather(*measuring)

        handled = sum(1 for at, _ in flooder.messages[1:] if at <= started + elapsed)
        cpu = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / elapsed
        record_property("flood_wire_kb_per_s", round(written / elapsed / 1000))
        record_property("flood_inflated_mib_offered_per_s", round(written / len(frame) / elapsed))
        record_property("flood_messages_handled_per_s", round(handled / elapsed, 1))
        record_property("others_round_trip_p50_ms", round(_percentile(round_trips, 0.5) * 1000, 1))
        record_property("others_round_trip_p99_ms", round(_percentile(round_trips, 0.99) * 1000, 1))
        record_property("others_round_trip_max_ms", round(max(round_trips) * 1000, 1))
        record_property("worker_rss_growth_mb", round((rss_peak - rss_before) / MIB, 1))
        record_property("worker_cpu_percent", round(cpu * 100))

        # The other clients of the worker were served all along.
        assert len(round_trips) > 3 * FLOOD_SECONDS * 5
        assert _percentile(round_trips, 0.99) < 0.25 * SCALE
        # The flooder was slowed to its budget (one second of burst, then the rate), and
        # still served: not closed.
        assert handled <= 1.5 * (INFLATE_RATE * (elapsed + 1) / MIB) + 2
        assert handled >= 0.5 * INFLATE_RATE * elapsed / MIB
        assert flooder.closed is None
        # Memory: a few inflated messages at a time, not a read's worth of them.
        assert rss_peak - rss_before < 64 * MIB
        # The worker's loop kept beating: nothing swept or restarted.
        assert node.worker_pids() == pids
        assert node.health(expect_ok=True)
        log = node.log()
        assert "swept state of dead workers" not in log and "Traceback" not in log
        flooder.close()


async def test_a_burst_of_large_compressed_messages_is_slowed_and_loses_nothing(
    tmp_path: Path, settings: dict[str, Any], record_property: Callable[[str, object], None]
) -> None:
    """Over its budget, a client is not read from until the budget refills: every
    message is answered, in order, and the connection stays open."""
    rate = 2 * MIB
    settings["server"]["websocket_inflate_rate"] = rate
    count, size = 8, MIB - 1024
    with compressing_node(tmp_path, settings) as node:
        async with client(node.url("ann")) as ann:
            started = time.monotonic()
            for n in range(count):
                await ann.send({"type": "ping", "n": n, "data": "x" * size})
            for n in range(count):
                echo = await ann.expect("echo", timeout=20)
                assert echo["data"]["n"] == n and len(echo["data"]["data"]) == size
            took = time.monotonic() - started
            assert await ann.request({"type": "ping", "n": count}, "echo")
    record_property("burst_mib", round(count * size / MIB, 1))
    record_property("burst_took_s", round(took, 2))
    # One second of burst passes at once; the rest at the rate.
    assert took >= 0.8 * (count * size - rate) / rate


async def test_a_single_bomb_is_refused_with_1009(tmp_path: Path, settings: dict[str, Any]) -> None:
    """A message that inflates beyond `server.max_message_size` closes its connection
    with 1009 (websockets' limit applies after inflation); the others are not touched."""
    with compressing_node(tmp_path, settings) as node:
        async with client(node.url("ann")) as ann:
            bomber = RawClient(node.port, "bomber")
            bomber.handshake()
            bomber.read_in_background()
            # Bombs of 2 MiB written in pieces, after a message that fits.
            bomber.sock.sendall(bomber.frame(_bomb(MIB // 2)))
            bomb = bomber.frame(_bomb(2 * MIB))
            for at in range(0, len(bomb), 300):
                bomber.sock.sendall(bomb[at : at + 300])
            wait_until(lambda: bomber.closed is not None, 5, "the bomber's close frame")
            assert bomber.closed is not None and bomber.closed.data[:2] == b"\x03\xf1"  # 1009
            echoes = [m for _, m in bomber.messages if '"echo"' in m]
            assert len(echoes) == 1  # the message before the bomb was answered
            bomber.close()
            assert await ann.request({"type": "ping"}, "echo")


@pytest.mark.parametrize("what", ["compressed", "unmasked"])
async def test_frames_that_fail_with_the_handshake_leave_the_worker_unharmed(
    tmp_path: Path, settings: dict[str, Any], what: str
) -> None:
    """A compressed frame sent with the upgrade request (before compression is
    negotiated), or an unmasked one, fails the connection at once.

    Before: the worker answered the handshake after websockets had ended the stream; the
    write raised in the loop, and again when the worker stopped, with status 1.
    """
    # The rogue's failed connection stays open at its end until the handshake timer.
    settings["server"]["handshake_timeout"] = 2
    with compressing_node(tmp_path, settings) as node:
        template = RawClient(node.port, "template")
        template.handshake()
        frame = template.frame(_bomb(64 * 1024))
        template.close()
        if what == "unmasked":
            frame = bytes([0x81, 2]) + b"{}"
        rogue = RawClient(node.port, "rogue")
        rogue.protocol.send_request(rogue.request)
        rogue.sock.sendall(b"".join(rogue.protocol.data_to_send()) + frame * 20)
        assert rogue.sock.recv(65536) == b""  # dropped, not answered
        # The rogue keeps its end open, as it may: the server must not write after its
        # end of stream, neither when it registers the connection nor when it stops.
        async with client(node.url("ann")) as ann:
            assert await ann.request({"type": "ping"}, "echo")
        node.stop()
        rogue.close()
        assert node.wait(5) == 0
        log = node.log()
        assert "Traceback" not in log and "exit status 1" not in log
