"""Public-key tokens: RS256 from a key file, ES256 from a JWKS served over HTTP, and the
algorithm confusion attack (an HS256 token whose secret is the public key)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from support import FAST_REDIS, Client, RedisServer, Shoal, eventually, wait_until


def settings_for(redis_server: RedisServer, prefix: str, jwt_config: dict[str, Any]) -> Any:
    return {
        "server": {"worker_num": 2},
        "redis": {"url": redis_server.url, "prefix": prefix, **FAST_REDIS},
        "tasks": {"task_worker_num": 0},
        "auth": {"jwt": jwt_config},
    }


def claims(sub: str) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time()) + 300, "aud": "chat", "iss": "https://idp"}


async def status_of(port: int, token: str) -> int:
    try:
        async with connect(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
            await Client(ws).expect("authenticated")
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def admitted(port: int, token: str) -> None:
    """Wait until a handshake with `token` is admitted: a worker answers 503 until it has
    fetched the JWKS."""

    async def accepted() -> bool:
        return await status_of(port, token) == 101

    await eventually(accepted, 10, "a token of the JWKS's key admitted")


async def test_rs256_with_a_public_key_file(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public_pem)
    config = {
        "public_key_file": str(key_file),
        "algorithms": ["RS256"],
        "audience": "chat",
        "issuer": "https://idp",
    }
    node = Shoal(tmp_path, settings_for(redis_server, prefix, config)).start()
    try:
        assert await status_of(node.port, jwt.encode(claims("ann"), private, "RS256")) == 101
        wrong_audience = {**claims("ann"), "aud": "billing"}
        assert await status_of(node.port, jwt.encode(wrong_audience, private, "RS256")) == 401
        # Algorithm confusion: an HS256 token "signed" with the public key as its secret.
        # PyJWT refuses to encode it, so the signature is made by hand, as an attacker would.
        forged = forge_hs256(claims("admin"), public_pem)
        assert await status_of(node.port, forged) == 401
    finally:
        node.stop()


def forge_hs256(body: dict[str, Any], secret: bytes) -> str:
    import base64  # noqa: PLC0415 - only the forgery needs it
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(body).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


class _Jwks(http.server.BaseHTTPRequestHandler):
    document: bytes = b"{}"
    hits = 0
    # Set: each answer waits for it (an identity provider that is slow to answer).
    held: threading.Event | None = None

    def do_GET(self) -> None:
        type(self).hits += 1
        if self.held is not None:
            self.held.wait(30)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, type[_Jwks]]]:
    handler = type("Jwks", (_Jwks,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", handler
    server.shutdown()
    server.server_close()


async def test_handshakes_get_503_until_the_jwks_is_fetched(
    tmp_path: Path, redis_server: RedisServer, prefix: str, jwks_server: Any
) -> None:
    """While a worker waits for the identity provider, a valid token is not refused: the
    handshake gets 503 (retry later), and succeeds once the keys are in."""
    address, handler = jwks_server
    handler.held = threading.Event()
    private = ec.generate_private_key(ec.SECP256R1())
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    handler.document = json.dumps({"keys": [{**public_jwk, "kid": "k1"}]}).encode()
    config = {"jwks_url": address, "algorithms": ["ES256"], "audience": "chat",
              "issuer": "https://idp"}  # fmt: skip
    node = Shoal(tmp_path, settings_for(redis_server, prefix, config)).start()
    try:
        wait_until(lambda: handler.hits >= 2, 10, "both workers to ask for the JWKS")
        good = jwt.encode(claims("ann"), private, "ES256", headers={"kid": "k1"})
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{node.port}/ws?token={good}"):
                pass
        response = refused.value.response
        assert response.status_code == 503
        assert json.loads(response.body)["reason"] == "signing keys not loaded yet"
        handler.held.set()
        await admitted(node.port, good)
    finally:
        handler.held.set()
        node.stop()


async def test_es256_keys_from_a_jwks(
    tmp_path: Path, redis_server: RedisServer, prefix: str, jwks_server: Any
) -> None:
    """Keys are fetched at start and looked up by `kid`; a token of an unknown key or of
    a key not in the JWKS is refused."""
    address, handler = jwks_server
    private = ec.generate_private_key(ec.SECP256R1())
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    handler.document = json.dumps(
        {"keys": [{**public_jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]}
    ).encode()
    config = {"jwks_url": address, "algorithms": ["ES256"], "audience": "chat",
              "issuer": "https://idp"}  # fmt: skip
    node = Shoal(tmp_path, settings_for(redis_server, prefix, config)).start()
    try:
        good = jwt.encode(claims("ann"), private, "ES256", headers={"kid": "k1"})
        await admitted(node.port, good)
        other = ec.generate_private_key(ec.SECP256R1())
        unknown_kid = jwt.encode(claims("ann"), other, "ES256", headers={"kid": "k2"})
        assert await status_of(node.port, unknown_kid) == 401
        wrong_key = jwt.encode(claims("ann"), other, "ES256", headers={"kid": "k1"})
        assert await status_of(node.port, wrong_key) == 401
    finally:
        node.stop()
