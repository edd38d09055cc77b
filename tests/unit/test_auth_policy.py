"""The pure side of authentication: where a token is found, what each role may do, and
what the verifier accepts."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from shoal.core.auth import (
    Policy,
    RoomRule,
    Unauthorized,
    Verifier,
    select_subprotocol,
    token_from,
    without_token,
)

SECRET = "unit-test-secret-0123456789abcdef0123456789"


def test_token_sources_in_order() -> None:
    header = {"Authorization": "Bearer from-header"}
    assert token_from("/ws?token=from-query", header, ["bearer.from-protocol"]) == "from-query"
    assert token_from("/ws", header, ["bearer.from-protocol"]) == "from-header"
    assert token_from("/ws", {}, ["shoal", "bearer.from-protocol"]) == "from-protocol"
    assert token_from("/ws", {"Authorization": "Basic abc"}, ["bearer."]) is None
    assert token_from("/ws?user_id=ann", {}, []) is None


def test_the_token_is_hidden_from_the_request_path() -> None:
    assert without_token("/ws?a=1&token=secret&b=2") == "/ws?a=1&token=***&b=2"
    assert without_token("/ws?user_id=ann") == "/ws?user_id=ann"


def test_subprotocol_selection_answers_one_of_the_offers() -> None:
    assert select_subprotocol(["bearer.x", "shoal"]) == "shoal"
    assert select_subprotocol(["bearer.x"]) == "bearer.x"
    assert select_subprotocol(["chat"]) is None


def test_declared_roles_and_configured_overrides() -> None:
    declared = {"kick_user": ("moderator", "admin"), "ban_user": ("admin",)}
    policy = Policy(declared)
    assert policy.may_send("user", "room_message")
    assert not policy.may_send("user", "kick_user")
    assert policy.may_send("moderator", "kick_user")
    assert not policy.may_send("moderator", "ban_user")
    configured = Policy(declared, {"support": ["*", "kick_user"], "reader": ["join_room"]})
    assert configured.may_send("support", "kick_user")  # granted by name
    assert configured.may_send("support", "room_message")  # `*`: every undeclared type
    assert not configured.may_send("support", "ban_user")  # `*` never covers declared ones
    assert not configured.may_send("reader", "room_message")
    assert configured.may_send("admin", "ban_user")  # not configured: the declarations


def test_room_rules_first_match_wins() -> None:
    rules = [RoomRule("staff.public", frozenset({"user", "admin"})),
             RoomRule("staff.*", frozenset({"admin"}))]  # fmt: skip
    policy = Policy({}, rooms=rules, presence_all=["admin"])
    assert policy.may_join("user", "staff.public")
    assert not policy.may_join("user", "staff.secret")
    assert policy.may_join("admin", "staff.secret")
    assert policy.may_join("user", "lobby")
    assert not policy.may_list_everyone("user")
    assert Policy({}).may_list_everyone("user")


def test_the_verifier_accepts_only_its_algorithms() -> None:
    verifier = Verifier(SECRET, ["HS256"], leeway=0)
    good = jwt.encode({"sub": "ann", "exp": time.time() + 60, "role": "admin"}, SECRET)
    identity = verifier.identify(good)
    assert (identity.user_id, identity.role, identity.authenticated) == ("ann", "admin", True)
    for token, reason in [
        (
            jwt.encode({"sub": "ann", "exp": time.time() + 60}, "", "none"),
            "algorithm not allowed",
        ),
        (jwt.encode({"sub": "ann", "exp": time.time() - 1}, SECRET), "token expired"),
        (jwt.encode({"exp": time.time() + 60}, SECRET), "token lacks the sub claim"),
        (
            jwt.encode({"sub": "ann", "exp": time.time() + 60, "role": ["admin"]}, SECRET),
            "invalid role claim",
        ),
    ]:
        with pytest.raises(Unauthorized) as refused:
            verifier.identify(token)
        assert str(refused.value) == reason


def test_leeway_tolerates_clock_skew() -> None:
    token = jwt.encode({"sub": "ann", "exp": time.time() - 5}, SECRET)
    assert Verifier(SECRET, ["HS256"], leeway=30).identify(token).user_id == "ann"


def test_a_jwks_without_usable_keys_is_refused() -> None:
    verifier = Verifier(None, ["ES256"])
    with pytest.raises(ValueError, match="not a usable JWKS"):
        verifier.use_jwks({"keys": "nope"})
    # No keys held (the JWKS was refused): an ES256 token has no key to be checked against.
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": "a", "exp": time.time() + 9}, key, "ES256", headers={"kid": "k"})
    with pytest.raises(Unauthorized, match="unknown signing key"):
        verifier.identify(token)
    # An HS256 token never reaches a public-key verifier's keys.
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        verifier.identify(jwt.encode({"sub": "a", "exp": time.time() + 9}, "k" * 32, "HS256"))
