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
    room: str = field(default_factory=lambda: f"bench-{secrets.token_hex(4)}")
    user_prefix: str = field(default_factory=lambda: f"b{secrets.token_hex(3)}")

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
        """The server URL with ``user_id`` added to the query (unless raw echo)."""
        if self.raw:
            return self.url
        parts = urlsplit(self.url)
        query = [*parse_qsl(parts.query), ("user_id", self.user_id(index))]
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def waits_for_welcome(self) -> bool:
        """Whether a connection counts only once the server's welcome arrived."""
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
