"""Who may open a connection: the token (401), the ban list (403) and the limits of the
client's address (429), decided during the opening handshake, before any WebSocket frame.

`identify()` runs in the read callback: a token is checked with no I/O. A ban and the
address counts are in Redis, so with authentication or an address limit on the worker
defers the handshake (`shoal.workers.transport.DEFER`) for one round trip (`checks()` /
`refusal()`); with both off, nothing is looked up and the handshake completes at once.
"""

from __future__ import annotations

import asyncio
import http
import logging
import secrets
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.headers import parse_subprotocol
from websockets.http11 import Request

from shoal.config.model import AuthConfig
from shoal.core import auth
from shoal.core.auth import Identity, Unauthorized, Verifier
from shoal.core.backoff import full_jitter
from shoal.core.errors import ServiceUnavailable
from shoal.core.keys import Keys
from shoal.workers.addresses import Addresses

logger = logging.getLogger(__name__)

Command = tuple[Any, ...]
_JWKS_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A handshake refused after its Redis checks.

    Attributes:
        label: its `handshakes_refused` reason.
        status: the HTTP status.
        body: the JSON body, `{"error", "reason", ...}`.
        retry_after: the `Retry-After` value.
    """

    label: str
    status: int
    body: dict[str, Any]
    retry_after: str


def verifier(config: AuthConfig) -> Verifier | None:
    """The token verifier `auth.jwt` describes; None when authentication is off."""
    jwt = config.jwt
    if jwt is None:
        return None
    key: str | bytes | None = jwt.secret_value()
    if jwt.public_key_file is not None:
        key = auth.read_key(jwt.public_key_file)
    return Verifier(
        key, jwt.algorithms, audience=jwt.audience, issuer=jwt.issuer, leeway=jwt.leeway
    )


def anonymous_id() -> str:
    return f"u-{secrets.token_hex(6)}"


class Gate:
    """The handshake's identity and admission checks of one worker.

    Args:
        config: the `auth` section.
        keys: Redis key names (bans).
        verifier: checks tokens; None when authentication is off.
        addresses: the limits of each client address.
    """

    def __init__(
        self, config: AuthConfig, keys: Keys, verifier: Verifier | None, addresses: Addresses
    ) -> None:
        self.config = config
        self.keys = keys
        self.verifier = verifier
        self.addresses = addresses
        self.leeway = config.jwt.leeway if config.jwt is not None else 0.0
        self.keys_loaded = verifier is None or config.jwt is None or config.jwt.jwks_url is None

    @property
    def enabled(self) -> bool:
        """Whether tokens are verified."""
        return self.verifier is not None

    def identify(self, request: Request) -> Identity:
        """Who the handshake `request` is from.

        Raises:
            Unauthorized: a token is required and missing, or a token is invalid.
            ProtocolError: authentication is off and `user_id` is invalid.
            ServiceUnavailable: the JWKS has not been fetched yet.
        """
        path = request.path
        if self.verifier is None:
            return Identity(auth.user_from(path) or anonymous_id(), auth.DEFAULT_ROLE)
        offered: list[str] = []
        for value in request.headers.get_all("Sec-WebSocket-Protocol"):
            offered += parse_subprotocol(value)
        token = auth.token_from(path, request.headers, offered)
        if token is None:
            if self.config.required:
                raise Unauthorized("missing token")
            return Identity(anonymous_id(), auth.ANONYMOUS_ROLE)
        return self.verify(token)

    def verify(self, token: str) -> Identity:
        """The identity `token` proves (also for a `refresh` message).

        Raises:
            Unauthorized: the token is invalid.
            ServiceUnavailable: the JWKS has not been fetched yet.
        """
        assert self.verifier is not None
        if not self.keys_loaded:
            raise ServiceUnavailable("signing keys not loaded yet")
        return self.verifier.identify(token)

    def checks(self, identity: Identity, slot: tuple[str, str] | None) -> list[Command]:
        """The Redis commands whose replies decide whether `identity` may connect (none:
        it may, at once).

        Args:
            slot: (client address, connection id) to take a slot of the address limits
                for; None when they are off. Once the commands are sent, the slot must
                be given back when the connection is gone, whatever `refusal()` says.
        """
        commands: list[Command] = []
        if identity.authenticated:
            commands.append(("GET", self.keys.ban(identity.user_id)))
        if slot is not None:
            commands += self.addresses.reserve(*slot)
        return commands

    def refusal(self, identity: Identity, replies: list[Any]) -> Refusal | None:
        """Why the replies to `checks()` refuse the handshake, or None."""
        if identity.authenticated:
            ban = replies[0]
            if ban is not None:
                try:
                    record = orjson.loads(ban)
                    until = int(record["until"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    until = 0
                body = {"error": "forbidden", "reason": "banned", "until": until}
                return Refusal("banned", http.HTTPStatus.FORBIDDEN, body, seconds_until(until))
        if len(replies) > int(identity.authenticated):
            over = self.addresses.refusal(replies[-1])
            if over is not None:
                reason, limit, wait = over
                body = {"error": "too many requests", "reason": reason, "limit": limit}
                return Refusal(reason, http.HTTPStatus.TOO_MANY_REQUESTS, body, str(wait))
        return None

    async def keep_keys(self) -> None:
        """Fetch the JWKS (`auth.jwt.jwks_url`) now and every `jwks_refresh` seconds; on
        failure, retry with backoff and keep the keys already held."""
        jwt = self.config.jwt
        assert self.verifier is not None
        assert jwt is not None
        assert jwt.jwks_url is not None
        attempt = 0
        while True:
            try:
                document = await asyncio.to_thread(_fetch, jwt.jwks_url)
                self.verifier.use_jwks(document)
            except (OSError, ValueError) as exc:
                delay = full_jitter(attempt, 1.0, 60.0)
                attempt += 1
                logger.error("cannot load the JWKS from %s (%s); retrying in %.0fs",
                             jwt.jwks_url, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            if not self.keys_loaded:
                logger.info("loaded %d signing keys from %s", len(self.verifier.keys), jwt.jwks_url)
            self.keys_loaded = True
            attempt = 0
            await asyncio.sleep(jwt.jwks_refresh)


def _fetch(url: str) -> Mapping[str, Any]:
    """GET a JWKS document (in a thread: urllib blocks)."""
    with urllib.request.urlopen(url, timeout=_JWKS_TIMEOUT) as response:
        document = orjson.loads(response.read(1 << 20))
    if not isinstance(document, dict):
        raise ValueError("the JWKS is not a JSON object")
    return document


def seconds_until(epoch: int) -> str:
    """A `Retry-After` value."""
    return str(max(1, int(epoch - time.time())))
