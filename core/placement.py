"""What the master gives each child process it forks, whatever its kind."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.config.model import Config
from shoal.core.scoreboard import Scoreboard


@dataclass(frozen=True, slots=True)
class Placement:
    """A child's place in its node.

    Attributes:
        config: the validated configuration.
        seat: its seat on the scoreboard, where it beats and says it is ready.
        node_id: the node's id.
        redis_url: the Redis to use (the embedded one's socket, if any).
        scoreboard: the master's shared memory.
        master_pid: the master's pid: a child whose parent is another has lost it.
    """

    config: Config
    seat: int
    node_id: str
    redis_url: str
    scoreboard: Scoreboard
    master_pid: int
