"""`server.allowed_origins`: a browser page on another site cannot open a WebSocket to
shoal with its user's cookies (cross-site WebSocket hijacking); plain websockets clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from support import Shoal

APP = Origin("https://app.example.com")


@pytest.fixture
def node(tmp_path: Path, settings: dict[str, Any]) -> Any:
    settings["server"]["allowed_origins"] = [APP, "http://localhost:3000"]
    node = Shoal(tmp_path, settings).start()
    yield node
    node.stop()


async def test_other_origins_are_refused_with_403(node: Shoal) -> None:
    for origin in ("https://evil.example.com", "https://app.example.com.evil.net", "null"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(node.url(), origin=Origin(origin)):
                pass
        assert refused.value.response.status_code == 403


async def test_listed_origins_and_clients_without_one_are_accepted(node: Shoal) -> None:
    for origin in (APP, Origin("http://localhost:3000"), None):
        async with connect(node.url(), origin=origin) as ws:
            assert b'"welcome"' in (await ws.recv(decode=False))
