"""What a run does: the options every load process receives, and who plays which role.

Connections are numbered globally (0..total-1) and split into contiguous slices,
one per load process; roles derive from the global index alone, so every
process can compute who sends, who receives and what each receiver expects
without talking to the others.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SCENARIOS = ("connect", "echo", "fanout", "broadcast", "private", "task")
TASKS = ("noop", "process_data")
PROTOCOLS = ("shoal", "pusher")
"""What the load speaks: shoal's own JSON protocol, or Pusher's protocol 7 (`/app/{key}`)."""
PUSHER_SCENARIOS = ("connect", "fanout")
"""The scenarios with a Pusher counterpart: Pusher has no echo, broadcast, private
messages or tasks."""
_PUSHER_PATH = "/app/"


@dataclass(frozen=True)
class RunPlan:
    """Immutable description of one run against one server URL."""

    scenario: str
    url: str
    connections: int
    processes: int
    duration: float = 10.0
    warmup: float = 2.0
    drain: float = 5.0
    rate: float = 0.0
    pipeline: int = 1
    publishers: int = 1
    max_inflight: int = 32
    size: int = 64
    task: str = "noop"
    raw: bool = False
    welcome: bool = True
    connect_timeout: float = 10.0
    connect_concurrency: int = 256
    protocol: str = "shoal"
    pusher_secret: str | None = field(default=None, repr=False)
    """The Pusher app's secret, which signs the bench's private-channel subscriptions;
    never written to the results."""
    resume: bool = False
    """fanout (shoal protocol): a connection that is closed or drops reconnects and rejoins
    the room from the last offset it saw (a room with a history), instead of being lost."""
    room: str = field(default_factory=lambda: f"bench-{secrets.token_hex(4)}")
    user_prefix: str = field(default_factory=lambda: f"b{secrets.token_hex(3)}")

    def __post_init__(self) -> None:
        """Check what the protocol allows.

        Raises:
            ValueError: an unknown protocol, a Pusher run it cannot carry out, or a resume
                outside the shoal protocol's fanout.
        """
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}: one of {', '.join(PROTOCOLS)}")
        if self.resume and (self.scenario != "fanout" or self.protocol != "shoal"):
            raise ValueError(
                "--resume applies to fanout in the shoal protocol only: it rejoins the room "
                "from the room history's offsets, which only shoal's rooms have"
            )
        if self.protocol != "pusher":
            return
        if self.scenario not in PUSHER_SCENARIOS:
            raise ValueError(
                f"--protocol pusher runs {' and '.join(PUSHER_SCENARIOS)}, not {self.scenario}: "
                "Pusher has no counterpart of it"
            )
        pusher_key(self.url)
        if self.scenario == "fanout":
            # Client events go on private channels only, whose subscriptions are signed
            # over the socket id that the welcome (pusher:connection_established) carries.
            if not self.pusher_secret:
                raise ValueError(
                    "--protocol pusher fanout needs the app's secret (--pusher-secret) "
                    "to sign its private-channel subscriptions"
                )
            if not self.welcome:
                raise ValueError(
                    "--no-welcome does not apply to --protocol pusher fanout: subscriptions "
                    "are signed with the socket_id of pusher:connection_established"
                )

    def slices(self) -> list[range]:
        """Contiguous global index ranges, one per process (never empty)."""
        count = max(1, min(self.processes, self.connections))
        base, extra = divmod(self.connections, count)
        out: list[range] = []
        start = 0
        for k in range(count):
            size = base + (1 if k < extra else 0)
            out.append(range(start, start + size))
            start += size
        return out

    def user_id(self, index: int) -> str:
        """User id of connection ``index`` (unique per run, so runs never collide)."""
        return f"{self.user_prefix}-{index}"

    def url_for(self, index: int) -> str:
        """The server URL with ``user_id`` added to the query (unless raw echo); for
        Pusher, with ``protocol=7`` added unless the query names a protocol already, as
        pusher-js does."""
        if self.raw:
            return self.url
        parts = urlsplit(self.url)
        query = parse_qsl(parts.query)
        if self.protocol == "pusher":
            if any(name == "protocol" for name, _ in query):
                return self.url
            query.append(("protocol", "7"))
        else:
            query.append(("user_id", self.user_id(index)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def pusher_key(self) -> str:
        """The Pusher app key, from the URL's path ``/app/{key}``.

        Raises:
            ValueError: the URL's path is not ``/app/{key}``.
        """
        return pusher_key(self.url)

    @property
    def channel(self) -> str:
        """The Pusher channel of the fanout: private, since client events need one."""
        return f"private-{self.room}"

    @property
    def waits_for_welcome(self) -> bool:
        """Whether a connection counts only once the server's welcome arrived (Pusher:
        `pusher:connection_established`)."""
        return self.welcome and not self.raw

    # Roles -----------------------------------------------------------------

    def is_sender(self, index: int) -> bool:
        """Whether connection ``index`` originates stream messages."""
        if self.scenario in ("fanout", "broadcast"):
            return index < self.publishers
        return self.scenario == "private"

    def is_receiver(self, index: int) -> bool:
        """Whether connection ``index`` has its arrivals accounted."""
        if self.scenario == "fanout":
            return index >= self.publishers
        return self.scenario in ("broadcast", "private")

    def sources_of(self, index: int) -> list[int]:
        """Senders whose every message receiver ``index`` must get."""
        if not self.is_receiver(index):
            return []
        if self.scenario == "fanout":
            return list(range(self.publishers))
        if self.scenario == "broadcast":
            return [s for s in range(self.publishers) if s != index]
        return [index ^ 1]

    def senders(self) -> list[int]:
        """Every sending connection index."""
        return [i for i in range(self.connections) if self.is_sender(i)]

    def expects(self, receiver: int, source: int) -> bool:
        """Whether ``receiver`` must get every message of ``source`` (hot path)."""
        if self.scenario == "fanout":
            return source < self.publishers <= receiver
        if self.scenario == "broadcast":
            return source < self.publishers and source != receiver
        return self.scenario == "private" and source == receiver ^ 1


def pusher_key(url: str) -> str:
    """The app key of a Pusher endpoint's URL (``ws://host:port/app/{key}?protocol=7``).

    Raises:
        ValueError: the URL's path is not ``/app/{key}``.
    """
    path = urlsplit(url).path
    key = path[len(_PUSHER_PATH) :]
    if not path.startswith(_PUSHER_PATH) or not key or "/" in key:
        raise ValueError(f"a Pusher URL's path is /app/{{key}}, not {path or '/'!r}")
    return key
