"""Both clients over `wss://`, served by the workers themselves with a certificate from a
test authority (trustme): a trusted context connects, the system's default refuses."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from shoal.client import Client, ConnectFailed, GaveUp, PersistentClient

from support import SCALE, Shoal, wait_until


@pytest.fixture
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def secure(tmp_path: Path, settings: dict[str, Any], authority: trustme.CA) -> Iterator[Shoal]:
    cert = authority.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    settings["server"]["ssl_cert_file"] = str(tmp_path / "cert.pem")
    settings["server"]["ssl_key_file"] = str(tmp_path / "key.pem")
    node = Shoal(tmp_path, settings).start(wait=False)
    wait_until(lambda: node.health(expect_ok=True), 15, "both workers")
    yield node
    node.stop()


def trusting(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


async def test_both_clients_connect_with_a_trusted_context_only(
    secure: Shoal, authority: trustme.CA
) -> None:
    url = f"wss://127.0.0.1:{secure.port}/ws?user_id=tls"
    with Client(url, timeout=10 * SCALE, ssl=trusting(authority)) as c:
        assert c.receive_json()["user_id"] == "tls"
    with pytest.raises(ConnectFailed) as refused:
        Client(url, timeout=10 * SCALE)  # the system's trust store lacks the test CA
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    with pytest.raises(ValueError, match="wss://"):
        Client(url.replace("wss://", "ws://"), ssl=trusting(authority))

    async with PersistentClient(url, ssl=trusting(authority)) as pc:
        joined = await pc.join_room("secure")
        assert joined["members"] == ["tls"]
    # An untrusted certificate does not fix itself: no retrying in a loop.
    untrusting = PersistentClient(url, max_reconnect_attempts=None)
    with pytest.raises(GaveUp) as gave_up:
        await untrusting.start()
    assert isinstance(gave_up.value.__cause__, ConnectFailed)
    await untrusting.close()
