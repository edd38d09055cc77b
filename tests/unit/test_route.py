"""Routing one batch of bus messages to a worker's local connections, with no I/O."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgpack

from shoal.core import envelope
from shoal.core.keys import Keys, TopicKind
from shoal.workers.hub import Routed, route

KEYS = Keys("t")
ME = KEYS.bus_worker("n1.0.1")
LOBBY = KEYS.bus_topic(TopicKind.ROOM, "lobby")
NEWS = KEYS.bus_topic(TopicKind.CHANNEL, "news")


@dataclass(eq=False)
class Peer:
    """A local connection as route() sees one: hashable by identity, with an id and a flag
    saying whether it compresses. A value, not a mock: route() reads nothing else."""

    id: str
    deflate: bool = False


# The frames of RFC 6455 for the payloads used below, written out by hand: FIN + opcode
# (0x81 text, 0x82 binary), then the unmasked length, then the payload.
HI = b"\x81\x02hi"
YO = b"\x81\x02yo"
RAW = b"\x82\x03\x00\x01\xff"


class World:
    """The local state of one worker: ann, bo and cy, with ann and bo in the lobby."""

    def __init__(self, *, deflating: Collection[str] = ()) -> None:
        self.conns = {cid: Peer(cid, cid in deflating) for cid in ("ann", "bo", "cy")}
        self.topics: dict[bytes, set[Any]] = {LOBBY: {self.conns["ann"], self.conns["bo"]}}

    def route(self, *messages: tuple[bytes, bytes]) -> Routed:
        # route() is typed for real Connections; a Peer has the two attributes it reads.
        local: dict[str, Any] = self.conns
        return route(list(messages), local, self.topics, ME, KEYS.bus_all)


def frames(routed: Routed) -> dict[str, list[bytes]]:
    """The outbox by connection id."""
    return {conn.id: list(wire) for conn, wire in routed.outbox.items()}


def test_global_channel_reaches_every_local_connection_but_the_sender() -> None:
    """A broadcast reaches everyone here; the connection named as target is its sender."""
    routed = World().route((KEYS.bus_all, envelope.message(b"hi", "bo")))
    assert frames(routed) == {"ann": [HI], "cy": [HI]}
    assert routed.deflated == [] and routed.departed == [] and routed.rejected == 0


def test_global_channel_from_elsewhere_reaches_everyone() -> None:
    """A sender on another worker (or none) leaves out nobody here."""
    world = World()
    elsewhere = world.route((KEYS.bus_all, envelope.message(b"hi", "n2.0.7.1")))
    nobody = world.route((KEYS.bus_all, envelope.message(b"hi", None)))
    assert frames(elsewhere) == frames(nobody) == {"ann": [HI], "bo": [HI], "cy": [HI]}


def test_room_channel_reaches_its_local_members_only() -> None:
    """A room's channel reaches the room's members here, not cy, and not the sender."""
    world = World()
    assert frames(world.route((LOBBY, envelope.message(b"hi", None)))) == {
        "ann": [HI],
        "bo": [HI],
    }
    assert frames(world.route((LOBBY, envelope.message(b"hi", "ann")))) == {"bo": [HI]}


def test_channel_without_local_members_is_skipped() -> None:
    """A message for a room nobody here is in reaches no one and is no error."""
    routed = World().route((NEWS, envelope.message(b"hi", None)))
    assert routed.outbox == {} and routed.deflated == [] and routed.rejected == 0


def test_worker_channel_reaches_the_listed_connections_present_here() -> None:
    """The worker's own channel names its recipients; ids no longer here are skipped."""
    routed = World().route((ME, envelope.message(b"hi", ["cy", "gone", "ann"])))
    assert frames(routed) == {"cy": [HI], "ann": [HI]}


def test_frames_of_a_batch_are_collected_per_connection_in_order() -> None:
    """Each recipient's frames from the whole batch, in arrival order, text and binary."""
    routed = World().route(
        (LOBBY, envelope.message(b"hi", None)),
        (KEYS.bus_all, envelope.message(b"\x00\x01\xff", None, text=False)),
        (ME, envelope.message(b"yo", ["bo"])),
        (LOBBY, envelope.message(b"yo", "bo")),
    )
    assert frames(routed) == {
        "ann": [HI, RAW, YO],
        "bo": [HI, RAW, YO],
        "cy": [RAW],
    }
    # Framed once per message, not once per recipient: the very same bytes object.
    outbox = {conn.id: wires for conn, wires in routed.outbox.items()}
    assert outbox["ann"][1] is outbox["bo"][1] is outbox["cy"][0]


def test_compressing_connections_get_the_payload_to_frame_themselves() -> None:
    """A connection with permessage-deflate cannot take the shared frame: it gets
    (connection, frame, payload, text) items, in order, and nothing in the outbox."""
    routed = World(deflating={"bo"}).route(
        (LOBBY, envelope.message(b"hi", None)),
        (KEYS.bus_all, envelope.message(b"\x00\x01\xff", "ann", text=False)),
    )
    assert frames(routed) == {"ann": [HI], "cy": [RAW]}
    assert [(conn.id, wire, payload, text) for conn, wire, payload, text in routed.deflated] == [
        ("bo", HI, b"hi", True),
        ("bo", RAW, b"\x00\x01\xff", False),
    ]


def test_departed_users_are_collected() -> None:
    """A Departed envelope reaches no connection: its users go to `departed`, in order."""
    routed = World().route(
        (ME, envelope.departed([("zed", ["lobby", "r2"])])),
        (ME, envelope.departed([("yan", []), ("xi", ("r3",))])),
    )
    assert routed.departed == [("zed", ["lobby", "r2"]), ("yan", []), ("xi", ["r3"])]
    assert routed.outbox == {}


def test_undecodable_envelopes_are_counted_and_the_batch_goes_on() -> None:
    """Garbage and envelopes of an unknown version are skipped, counted, and one is kept as
    an example for the log; the messages around them are delivered."""
    routed = World().route(
        (LOBBY, envelope.message(b"hi", None)),
        (LOBBY, b"\xc1 not msgpack"),
        (KEYS.bus_all, msgpack.packb([2, 1, True, b"hi", None])),  # a newer version
        (LOBBY, envelope.message(b"yo", None)),
    )
    assert frames(routed) == {"ann": [HI, YO], "bo": [HI, YO]}
    assert routed.rejected == 2
    assert routed.rejected_example == "bus envelope of unknown version 2"


def test_envelope_of_the_right_shape_but_wrong_types_does_not_stop_the_batch() -> None:
    """An envelope that decodes but carries a number where the payload belongs (a peer's
    bug, or a foreign publisher on the channel) is rejected like garbage: the messages
    after it are still delivered."""
    routed = World().route(
        (LOBBY, msgpack.packb([1, 1, True, 5, None])),
        (LOBBY, envelope.message(b"hi", None)),
    )
    assert frames(routed) == {"ann": [HI], "bo": [HI]}
    assert routed.rejected == 1
