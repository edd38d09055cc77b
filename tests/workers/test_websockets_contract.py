"""What shoal relies on in websockets: its sans-I/O protocol API, exercised in memory
against websockets' own client protocol.

The worker's transport (`shoal.workers.transport`) drives `ServerProtocol` itself and
writes pre-built frames to the transport for fan-out. That API is public and documented,
but pyproject.toml still pins websockets below its next major version; these tests fail
loudly, naming what moved, if an upgrade changes any of it.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    enable_server_permessage_deflate,
)
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, CLOSING, OPEN
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from shoal.core import protocol


def test_the_pinned_major_version() -> None:
    assert version("websockets").split(".")[0] == "17", (
        "websockets changed major version: check shoal.workers.transport against it, "
        "then move the pin in pyproject.toml"
    )


def _pair(compression: bool) -> tuple[ServerProtocol, ClientProtocol]:
    """A server and a client protocol, handshake done, as the transport does it."""
    extensions = list(enable_server_permessage_deflate(None)) if compression else None
    server = ServerProtocol(extensions=extensions, max_size=1024)
    client = ClientProtocol(
        parse_uri("ws://shoal/ws?user_id=x"),
        extensions=[ClientPerMessageDeflateFactory()] if compression else None,
    )
    request = client.connect()
    client.send_request(request)
    server.receive_data(b"".join(client.data_to_send()))
    (event,) = server.events_received()
    assert type(event) is Request and event.path == "/ws?user_id=x"
    response = server.accept(event)
    assert response.status_code == 101
    server.send_response(response)
    client.receive_data(b"".join(server.data_to_send()))
    assert type(client.events_received()[0]) is Response
    assert server.state is OPEN and client.state is OPEN
    assert bool(server.extensions) is compression
    return server, client


@pytest.mark.parametrize("compression", [False, True])
def test_messages_both_ways_and_the_closing_handshake(compression: bool) -> None:
    server, client = _pair(compression)
    # A client message arrives as one Frame event.
    client.send_text(b'{"type":"x"}')
    server.receive_data(b"".join(client.data_to_send()))
    (frame,) = server.events_received()
    assert type(frame) is Frame and frame.opcode is Opcode.TEXT and frame.fin
    assert frame.data == b'{"type":"x"}'
    # A message through the protocol (compressed when negotiated).
    server.send_text(b'{"n":1}')
    if not compression:
        # The fan-out path: one pre-built frame, bytes written for every recipient.
        server_bytes = b"".join(server.data_to_send()) + protocol.frame(b'{"n":2}')
        client.receive_data(server_bytes)
        got = [f.data for f in client.events_received() if type(f) is Frame]
        assert got == [b'{"n":1}', b'{"n":2}']
    else:
        client.receive_data(b"".join(server.data_to_send()))
        got = [f.data for f in client.events_received() if type(f) is Frame]
        assert got == [b'{"n":1}']
    # The server closes: close frame, then the end of the stream once the client answers.
    server.send_close(4000, "slow consumer")
    assert server.state is CLOSING and server.close_expected()
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    server.receive_data(b"".join(d for d in client.data_to_send() if d))
    server.events_received()
    assert b"" in server.data_to_send()  # SEND_EOF: half-close the TCP connection
    server.receive_eof()
    assert server.state is CLOSED and server.close_code == 4000


def test_limits_and_refusals_the_transport_relies_on() -> None:
    server, client = _pair(compression=False)
    client.send_text(b"x" * 2000)  # over max_size (1024)
    server.receive_data(b"".join(client.data_to_send()))
    server.events_received()
    assert server.close_sent is not None and server.close_sent.code == 1009
    assert server.close_expected()

    refusing = ServerProtocol()
    response = refusing.reject(503, "server full\n")
    assert response.status_code == 503 and response.body == b"server full\n"
    refusing.send_response(response)
    assert refusing.data_to_send()[-1] == b""  # the end of the stream follows a refusal

    failing, _ = _pair(compression=False)
    failing.fail(1007, "invalid UTF-8")
    assert failing.state is CLOSING and failing.close_expected()


def test_what_the_fast_path_reads_of_the_parser_state() -> None:
    """The transport parses whole messages itself while websockets' parser is between
    frames (it hands websockets whole frames only) and outside a fragmented message:
    `current_size` is None then, and an int inside one."""
    server, client = _pair(compression=False)
    assert server.current_size is None and not server.extensions
    client.send_text(b"first", fin=False)
    server.receive_data(b"".join(client.data_to_send()))
    assert server.current_size == len(b"first")
    client.send_continuation(b" and last", fin=True)
    # Frames the transport parsed itself were never seen by websockets: it goes on from
    # the next whole frame as if it had parsed them.
    client.send_text(b"whole")
    server.receive_data(b"".join(client.data_to_send()))
    frames = [f for f in server.events_received() if type(f) is Frame]
    assert [f.data for f in frames] == [b"first", b" and last", b"whole"]
    assert server.current_size is None
