"""The Pusher protocol's pure parts: channel names, signatures (with the test vectors of
Pusher's documentation), frames."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from shoal.core import pusher
from shoal.core.pusher import ApiError, Kind, PusherError

KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"


def test_private_channel_signature_matches_pushers_vector() -> None:
    auth = pusher.channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None)
    assert auth == f"{KEY}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    assert pusher.check_auth(auth, auth)
    assert not pusher.check_auth(auth.replace("58df", "58dF"), auth)
    assert not pusher.check_auth(None, auth)
    assert not pusher.check_auth(f"otherkey:{auth.split(':')[1]}", auth)


def test_presence_signature_covers_the_exact_channel_data() -> None:
    data = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
    auth = pusher.channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", data)
    # The signed string, as Pusher documents it: socket_id:channel:channel_data.
    text = f"1234.1234:presence-foobar:{data}".encode()
    assert auth == f"{KEY}:{hmac.new(SECRET.encode(), text, hashlib.sha256).hexdigest()}"
    spaced = '{"user_id": 10, "user_info": {"name": "Mr. Channels"}}'
    assert auth != pusher.channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", spaced)


def test_http_api_signature_matches_pushers_vector() -> None:
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    params = {
        "auth_key": KEY,
        "auth_timestamp": "1353088179",
        "auth_version": "1.0",
        "body_md5": pusher.body_md5(body),
    }
    assert params["body_md5"] == "ec365a775a4cd0599faeb73354201b6f"
    signature = pusher.request_signature(SECRET, "POST", "/apps/3/events", params)
    assert signature == "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    signed = {**params, "auth_signature": signature}
    pusher.check_request(SECRET, "POST", "/apps/3/events", signed, body, now=1353088179 + 599)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"auth_timestamp": "1353088179"}, "Timestamp expired"),
        ({"auth_timestamp": "soon"}, "auth_timestamp"),
        ({"auth_version": "2.0"}, "auth_version"),
        ({"body_md5": "0" * 32}, "body_md5"),
        ({"auth_signature": "f" * 64}, "Invalid signature"),
        ({"auth_signature": "short"}, "auth_signature"),
        ({"name": "added-after-signing"}, "Invalid signature"),
    ],
)
def test_a_request_that_fails_a_check_is_401_saying_which(
    change: dict[str, str], message: str
) -> None:
    body = b'{"name":"foo"}'
    params = {"auth_key": KEY, "auth_timestamp": "2000000000", "auth_version": "1.0",
              "body_md5": pusher.body_md5(body)}  # fmt: skip
    params["auth_signature"] = pusher.request_signature(SECRET, "POST", "/apps/3/events", params)
    now = 2000000000 + (601 if change.get("auth_timestamp") == "1353088179" else 0)
    with pytest.raises(ApiError, match=message) as caught:
        pusher.check_request(SECRET, "POST", "/apps/3/events", {**params, **change}, body, now=now)
    assert caught.value.status == 401


def test_body_md5_is_checked_on_a_get_that_carries_it() -> None:
    # The Python server library sends md5("") on its GETs.
    params = {"auth_key": KEY, "auth_timestamp": "100", "auth_version": "1.0",
              "body_md5": "d41d8cd98f00b204e9800998ecf8427e", "info": "user_count"}  # fmt: skip
    params["auth_signature"] = pusher.request_signature(SECRET, "GET", "/apps/3/channels", params)
    pusher.check_request(SECRET, "GET", "/apps/3/channels", params, b"", now=100)
    with pytest.raises(ApiError, match="body_md5"):
        pusher.check_request(SECRET, "GET", "/apps/3/channels", params, b"x", now=100)


def test_parameters_are_signed_sorted_by_lower_cased_name_and_unescaped() -> None:
    text = pusher.string_to_sign(
        "get", "/apps/1/channels", {"b": "2", "A": "x,y", "auth_signature": "s"}
    )
    assert text == "GET\n/apps/1/channels\na=x,y&b=2"


def test_user_signin_signature() -> None:
    user_data = '{"id":"42"}'
    expected = pusher.sign(SECRET, '1.2::user::{"id":"42"}')
    assert pusher.user_auth(KEY, SECRET, "1.2", user_data) == f"{KEY}:{expected}"
    assert pusher.signed_in_user(user_data) == "42"
    for bad in (None, "not json", '{"id": ""}', '{"name": "x"}', "[]"):
        with pytest.raises(PusherError):
            pusher.signed_in_user(bad)


@pytest.mark.parametrize(
    ("name", "kind", "cache"),
    [
        ("orders", Kind.PUBLIC, False),
        ("cache-orders", Kind.PUBLIC, True),
        ("private-chat.1", Kind.PRIVATE, False),
        ("private-cache-x", Kind.PRIVATE, True),
        ("private-encrypted-x", Kind.ENCRYPTED, False),
        ("private-encrypted-cache-x", Kind.ENCRYPTED, True),
        ("presence-room@1,2;3=4", Kind.PRESENCE, False),
        ("presence-cache-room", Kind.PRESENCE, True),
        ("#server-to-user-42", Kind.USER, False),
    ],
)
def test_channel_kinds_follow_the_name_prefix(name: str, kind: Kind, cache: bool) -> None:
    parsed = pusher.channel(name)
    assert (parsed.name, parsed.kind, parsed.cache) == (name, kind, cache)
    assert parsed.authorized == (kind in (Kind.PRIVATE, Kind.ENCRYPTED, Kind.PRESENCE))
    assert parsed.takes_client_events == (kind in (Kind.PRIVATE, Kind.PRESENCE))


@pytest.mark.parametrize(
    "name",
    ["", "a b", "x" * 201, "é", "#other", "#server-to-user-", 5, None, ["private-x"], {"a": 1}],
)
def test_invalid_channel_names_are_refused(name: object) -> None:
    # Twice: parsed names are cached, refusals must not be (nor unhashable names reach it).
    for _ in range(2):
        with pytest.raises(PusherError):
            pusher.channel(name)


def test_socket_ids_have_the_form_the_server_libraries_require() -> None:
    assert pusher.valid_socket_id("123.456")
    for bad in ("123", "1.2.3", "a.1", "1.2\n", 1.2, None):
        assert not pusher.valid_socket_id(bad)


def test_client_frames_parse_and_bad_ones_are_refused() -> None:
    parsed = pusher.parse('{"event":"client-typing","channel":"private-a","data":{"x":1}}')
    assert parsed == pusher.ClientFrame("client-typing", "private-a", {"x": 1})
    for bad in ("nope", "[]", '{"data":1}', '{"event":""}', '{"event":"e","channel":3}'):
        with pytest.raises(PusherError):
            pusher.parse(bad)


def test_subscription_data_may_be_an_object_or_a_json_string() -> None:
    data = {"channel": "presence-a", "auth": "k:s", "channel_data": '{"user_id":"1"}'}
    assert pusher.subscription(data) == ("presence-a", "k:s", '{"user_id":"1"}')
    assert pusher.subscription(orjson.dumps(data).decode()) == (
        "presence-a",
        "k:s",
        '{"user_id":"1"}',
    )
    bad: object
    for bad in ("{", [], {"channel": "a", "channel_data": {"user_id": 1}}):
        with pytest.raises(PusherError):
            pusher.subscription(bad)


def test_signin_data_may_be_an_object_or_a_json_string() -> None:
    data = {"user_data": '{"id":"7"}', "auth": "k:s"}
    assert pusher.signin(data) == ('{"id":"7"}', "k:s")
    assert pusher.signin(orjson.dumps(data).decode()) == ('{"id":"7"}', "k:s")
    bad: object
    for bad in ("{", "[]", None, {"auth": "k:s"}, {"user_data": {"id": "7"}}):
        with pytest.raises(PusherError):
            pusher.signin(bad)


def test_presence_members_are_keyed_by_the_string_of_their_user_id() -> None:
    assert pusher.member('{"user_id":7,"user_info":{"n":1}}') == pusher.Member("7", {"n": 1})
    assert pusher.member('{"user_id":"ann"}') == pusher.Member("ann", None)
    for bad in (None, "x", "[]", '{"user_info":{}}', '{"user_id":""}'):
        with pytest.raises(PusherError):
            pusher.member(bad)


def test_server_frames_carry_data_as_a_json_string_unless_already_one() -> None:
    sent = orjson.loads(pusher.frame("greeting", {"a": 1}, "orders"))
    assert sent == {"event": "greeting", "channel": "orders", "data": '{"a":1}'}
    raw = '{"some": "data"}'  # from the HTTP API, forwarded byte for byte
    assert orjson.loads(pusher.frame("e", raw, "c"))["data"] == raw
    established = orjson.loads(pusher.connection_established("1.2", 30))
    assert orjson.loads(established["data"]) == {"socket_id": "1.2", "activity_timeout": 30}
    refused = orjson.loads(pusher.subscription_error("private-a", "Invalid signature", 401))
    assert refused["channel"] == "private-a" and refused["data"]["status"] == 401
    error = orjson.loads(pusher.error_frame("Over quota", 4004))
    assert error == {"event": "pusher:error", "data": {"code": 4004, "message": "Over quota"}}
    with_user = orjson.loads(pusher.frame("client-x", '{"a":1}', "presence-a", user_id="7"))
    assert with_user["user_id"] == "7"
