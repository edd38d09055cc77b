"""An independent client, Node's `ws`, speaks to shoal: a bug shared by our own client and
server cannot hide behind it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from support import SCALE, Shoal

INTEROP = Path(__file__).parents[1] / "interop"


def test_node_ws_client_speaks_the_chat_protocol(shoal: Shoal) -> None:
    """Welcome, a room across two clients, an error and a binary echo, seen by Node's ws."""
    node = shutil.which("node")
    assert node, "Node.js is missing: ./dev test installs it"
    assert (INTEROP / "node_modules" / "ws").is_dir(), (
        "run ./dev test (npm install in tests/interop)"
    )
    out = subprocess.run(
        [node, str(INTEROP / "chat_client.mjs"), shoal.url()],
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    by_client: dict[str, list[dict[str, object]]] = {"ann": [], "bo": []}
    for line in lines:
        by_client[line["client"]].append(line["message"])
    ann, bo = by_client["ann"], by_client["bo"]
    assert [m.get("type") for m in ann] == [
        "welcome",
        "joined_room",
        "user_joined_room",
        "room_message",
        "error",
        None,
    ]
    assert ann[3]["message"] == {"from": "node ws"} and ann[3]["from"] == "bo"
    assert ann[4] == {"type": "error", "message": "Invalid message format"}
    assert ann[5] == {"binary": "000102ff"}
    assert [m["type"] for m in bo] == ["welcome", "joined_room", "room_message"]
