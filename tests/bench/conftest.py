"""Fixtures: a plain-websockets peer server in a subprocess on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

TIMEOUT_SCALE = float(os.environ.get("SHOALTEST_TIMEOUT_SCALE", "1"))


class Peer:
    """A running peer: its URL and process id."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.pid = proc.pid


def _start(*flags: str) -> Peer:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.bench.peers.websockets_peer", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    # The peer prints "listening PORT" once bound; readline blocks until then.
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"peer failed to start: {line!r}")
    return Peer(proc, int(line.split()[1]))


@pytest.fixture
def start_peer() -> Iterator[Callable[..., Peer]]:
    """Factory starting peers with the given flags; all are stopped afterwards."""
    peers: list[Peer] = []

    def start(*flags: str) -> Peer:
        peer = _start(*flags)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.proc.terminate()
        peer.proc.wait(timeout=10 * TIMEOUT_SCALE)
