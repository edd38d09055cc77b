"""Who a client is, and what it may do: JSON Web Tokens at the handshake, roles, rooms.

Pure logic with no I/O (the JWKS download is the worker's, `Verifier.load_keys()`): the
worker asks `Verifier.identify()` during the opening handshake and refuses the handshake
with 401 when it raises `Unauthorized`; `Policy` answers, per message, whether a role may
send it, and whether it may join or list a room.

Tokens are checked with PyJWT: only the configured algorithms are accepted (so `alg:
none` and an HS256 token signed with an RS256 public key both fail), `exp` is required,
and `aud` / `iss` are checked when configured.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt

from shoal.core.errors import ProtocolError

USER_ID = re.compile(r"[\w.@:+-]{1,128}")
"""What a user id may be: 1-128 word characters or `.@:+-`."""
ROLE = re.compile(r"[\w.-]{1,64}")
DEFAULT_ROLE = "user"
ANONYMOUS_ROLE = "guest"
SUBPROTOCOL = "shoal"
"""The subprotocol a browser offers beside its token entry (`bearer.<token>`)."""
BEARER_PREFIX = "bearer."
ANY = "*"


class Unauthorized(Exception):
    """The handshake's token is missing or invalid; the message is the 401's reason."""


class PermissionDenied(ProtocolError):
    """The connection's role may not do this: answered as "Permission denied"."""

    def __init__(self) -> None:
        super().__init__("Permission denied")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, decided once, at its handshake.

    Attributes:
        user_id: the token's `sub`; without a token, the `user_id` query parameter (only
            when authentication is off) or a random anonymous id.
        role: the token's `role` claim (`user` when absent); `guest` for an anonymous
            connection when tokens are optional; `user` when authentication is off.
        claims: the token's verified claims (empty without a token).
        expires_at: the token's `exp` (epoch seconds), None without a token.
    """

    user_id: str
    role: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None

    @property
    def authenticated(self) -> bool:
        """Whether a verified token says who this is."""
        return self.expires_at is not None


def token_from(path: str, headers: Mapping[str, str], subprotocols: Iterable[str]) -> str | None:
    """The token a handshake carries: `?token=`, `Authorization: Bearer <token>`, or a
    `Sec-WebSocket-Protocol` entry `bearer.<token>` (for browsers, which cannot set
    headers), looked for in that order."""
    if "token=" in path:
        values = parse_qs(path.partition("?")[2]).get("token")
        if values:
            return values[0]
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    for entry in subprotocols:
        if entry.startswith(BEARER_PREFIX) and len(entry) > len(BEARER_PREFIX):
            return entry[len(BEARER_PREFIX) :]
    return None


def user_from(path: str) -> str | None:
    """The `user_id` query parameter, if any (honoured only when authentication is off).

    Raises:
        ProtocolError: it is present but not a valid user id.
    """
    if "user_id=" not in path:
        return None
    values = parse_qs(path.partition("?")[2]).get("user_id")
    if not values:
        return None
    if not USER_ID.fullmatch(values[0]):
        raise ProtocolError("Invalid user_id")
    return values[0]


def without_token(path: str) -> str:
    """`path` with the value of its `token` query parameter hidden (`token=***`), so that
    what applications and logs see of the request never carries a credential."""
    if "token=" not in path:
        return path
    base, _, query = path.partition("?")
    parts = ["token=***" if part.startswith("token=") else part for part in query.split("&")]
    return f"{base}?{'&'.join(parts)}"


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol to answer: `shoal` when offered; else a `bearer.` entry, since a
    browser that offered one fails the connection unless the server picks one of its
    offers; else none."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    for entry in offered:
        if entry.startswith(BEARER_PREFIX):
            return entry
    return None


class Verifier:
    """Checks tokens against one key (a secret or a public key) or a JWKS.

    Args:
        key: the HMAC secret or the PEM public key; None with a JWKS.
        algorithms: accepted `alg` values; nothing else is.
        audience, issuer: required `aud` / `iss` values, if set.
        leeway: seconds of clock skew allowed on `exp`, `nbf` and `iat`.
    """

    def __init__(
        self,
        key: str | bytes | None,
        algorithms: Sequence[str],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        self.key = key
        self.algorithms = list(algorithms)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.keys: dict[str, Any] = {}
        """A JWKS's keys by `kid`, set by `use_jwks()`."""
        required = ["exp", "sub"]
        if audience is not None:
            required.append("aud")
        if issuer is not None:
            required.append("iss")
        self.options: Any = {"require": required}

    def use_jwks(self, jwks: Mapping[str, Any]) -> None:
        """Take the keys of a JWKS document (`{"keys": [...]}`); keys of algorithms
        outside `algorithms` are left out.

        Raises:
            ValueError: the document holds no usable key.
        """
        try:
            key_set = jwt.PyJWKSet.from_dict(dict(jwks))
        except jwt.PyJWTError as exc:
            raise ValueError(f"not a usable JWKS: {exc}") from exc
        keys = {
            key.key_id or "": key
            for key in key_set.keys
            if key.algorithm_name in self.algorithms or key.algorithm_name == "UNKNOWN"
        }
        if not keys:
            raise ValueError("the JWKS holds no key for the accepted algorithms")
        self.keys = keys

    def identify(self, token: str) -> Identity:
        """The identity a token proves.

        Raises:
            Unauthorized: with a short reason: malformed, bad signature, expired, not for
                this audience or issuer, a claim missing, an algorithm not accepted.
        """
        key = self._key_for(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self.options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise Unauthorized("algorithm not allowed") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthorized("invalid signature") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthorized("invalid audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthorized("invalid issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim} claim") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthorized("token not yet valid") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token") from exc
        return identity_of(claims)

    def _key_for(self, token: str) -> Any:
        if self.key is not None:
            return self.key
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token") from exc
        if header.get("alg") not in self.algorithms:
            raise Unauthorized("algorithm not allowed")
        kid = header.get("kid")
        found = self.keys.get(kid if isinstance(kid, str) else "")
        if found is None and kid is None and len(self.keys) == 1:
            found = next(iter(self.keys.values()))
        if found is None:
            raise Unauthorized("unknown signing key")
        return found


def identity_of(claims: Mapping[str, Any]) -> Identity:
    """The identity verified `claims` describe.

    Raises:
        Unauthorized: `sub` is not a valid user id, or `role` not a valid role name.
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        raise Unauthorized("invalid sub claim: 1-128 word characters or .@:+-")
    role = claims.get("role", DEFAULT_ROLE)
    if not isinstance(role, str) or not ROLE.fullmatch(role):
        raise Unauthorized("invalid role claim")
    return Identity(sub, role, dict(claims), float(claims["exp"]))


def read_key(path: str) -> bytes:
    """A PEM public key file's content."""
    with open(os.path.expanduser(path), "rb") as file:
        return file.read()


@dataclass(frozen=True, slots=True)
class RoomRule:
    """Rooms whose names match `pattern` (shell-style: `*`, `?`, `[...]`) may be joined,
    and listed with `presence`, by `roles` only."""

    pattern: str
    roles: frozenset[str]

    def matches(self, room: str) -> bool:
        return fnmatch.fnmatchcase(room, self.pattern)


class Policy:
    """What each role may do.

    Args:
        declared: message type -> roles its handler allows (`App.on(..., roles=...)`);
            a type not in it is open to every role.
        roles: `auth.roles`, role -> the message types it may send (`*`: every type
            whose handler declares no roles). A role not in it follows `declared`.
        rooms: `auth.rooms`, the first rule whose pattern matches a room applies.
        presence_all: roles that may list every connection (`presence` without a room);
            None: every role.
    """

    def __init__(
        self,
        declared: Mapping[str, Iterable[str]],
        roles: Mapping[str, Iterable[str]] | None = None,
        rooms: Iterable[RoomRule] = (),
        presence_all: Iterable[str] | None = None,
    ) -> None:
        self.declared = {kind: frozenset(allowed) for kind, allowed in declared.items()}
        self.roles = {role: frozenset(kinds) for role, kinds in (roles or {}).items()}
        self.rooms = tuple(rooms)
        self.presence_all = None if presence_all is None else frozenset(presence_all)
        # Answers are cached per (role, type): the check runs for every message.
        self._answers: dict[tuple[str, str], bool] = {}

    @property
    def restricts_messages(self) -> bool:
        """Whether any message type is closed to some role (else no check is needed)."""
        return bool(self.declared or self.roles)

    def may_send(self, role: str, kind: str) -> bool:
        """Whether `role` may send messages of type `kind`."""
        key = (role, kind)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._decide(role, kind)
            if len(self._answers) < 4096:  # types come from clients: bound the cache
                self._answers[key] = answer
        return answer

    def _decide(self, role: str, kind: str) -> bool:
        declared = self.declared.get(kind)
        granted = self.roles.get(role)
        if granted is None:
            return declared is None or role in declared
        return kind in granted or (ANY in granted and declared is None)

    def may_join(self, role: str, room: str) -> bool:
        """Whether `role` may join `room` and list its members."""
        for rule in self.rooms:
            if rule.matches(room):
                return role in rule.roles
        return True

    def may_list_everyone(self, role: str) -> bool:
        """Whether `role` may ask `presence` of the whole deployment."""
        return self.presence_all is None or role in self.presence_all


OPEN_POLICY = Policy({})
"""Every role may do everything: an application's view before a worker sets its policy."""
