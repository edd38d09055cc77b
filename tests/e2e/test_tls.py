"""`wss://` served by the workers themselves, with a certificate from a test authority
(trustme); plain websockets clients over TLS."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect

from support import SHOAL, Shoal, wait_until


@pytest.fixture
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def node(tmp_path: Path, settings: dict[str, Any], authority: trustme.CA) -> Any:
    cert = authority.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    settings["server"]["ssl_cert_file"] = str(tmp_path / "cert.pem")
    settings["server"]["ssl_key_file"] = str(tmp_path / "key.pem")
    node = Shoal(tmp_path, settings).start(wait=False)
    yield node
    node.stop()


def client_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


def health(node: Shoal, context: ssl.SSLContext) -> dict[str, Any] | None:
    try:
        url = f"https://127.0.0.1:{node.port}/healthz"
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
    except OSError:
        return None
    # The public /healthz says ok, and nothing more; the admin listener (plain HTTP)
    # counts the workers.
    assert body == {"status": "ok"}
    return body if node.health(expect_ok=True) else None


async def test_clients_connect_over_tls_and_chat(node: Shoal, authority: trustme.CA) -> None:
    context = client_context(authority)
    wait_until(lambda: health(node, context), 15, "both workers over https")
    url = f"wss://127.0.0.1:{node.port}/ws?user_id=ann"
    async with connect(url, ssl=context) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome" and welcome["user_id"] == "ann"
        await ws.send(json.dumps({"type": "join_room", "room": "r"}))
        assert json.loads(await ws.recv())["type"] == "joined_room"
        await ws.send(json.dumps({"type": "room_message", "room": "r", "message": "hi"}))
        assert json.loads(await ws.recv())["message"] == "hi"
    assert f"wss://127.0.0.1:{node.port}/ws" in node.log()


async def test_a_client_that_does_not_trust_the_certificate_is_refused(
    node: Shoal, authority: trustme.CA
) -> None:
    wait_until(lambda: health(node, client_context(authority)), 15, "both workers over https")
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(f"wss://127.0.0.1:{node.port}/ws", ssl=ssl.create_default_context()):
            pass
    # Plain ws:// on a TLS port is no handshake either.
    with pytest.raises(Exception):  # noqa: B017, PT011 - whichever way the server drops it
        async with connect(f"ws://127.0.0.1:{node.port}/ws", open_timeout=5):
            pass
    # The server went on serving.
    assert health(node, client_context(authority)) is not None


def test_missing_or_mismatched_files_are_config_errors(
    tmp_path: Path, authority: trustme.CA
) -> None:
    cert = authority.issue_cert("localhost")
    other = authority.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    cases = {
        "no such file": (tmp_path / "missing.pem", tmp_path / "other-key.pem"),
        "cannot load the certificate and its key": (
            tmp_path / "cert.pem",
            tmp_path / "other-key.pem",
        ),
    }
    for expected, (cert_file, key_file) in cases.items():
        config = tmp_path / "c.yaml"
        config.write_text(f"server: {{ssl_cert_file: '{cert_file}', ssl_key_file: '{key_file}'}}\n")
        out = subprocess.run(
            [*SHOAL, "check-config", str(config)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 2
        assert "server.ssl_" in out.stderr and expected in out.stderr
