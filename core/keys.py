"""Every Redis key and pub/sub channel shoal uses. Nothing else assembles a key.

All names start with the configured prefix, so deployments with different prefixes on
one Redis never see each other. The layout (also in docs/architecture.md):

| key | type | holds |
|---|---|---|
| `P:conn:<cid>` | hash | `worker`, `node`, `user`, `addr`, `at` (ms), `meta` (JSON), and one field per room (`r:<name>`) and channel (`c:<name>`) the connection is in, and per Pusher channel (`p:<app>:<channel>`, whose value is the presence member's user id, or `""`) |
| `P:room:<name>` | hash | member connection id -> user id |
| `P:chan:<name>` | hash | subscriber connection id -> user id |
| `P:roomusers:<name>` / `P:chanusers:<name>` | hash | user id -> that user's connections in the room (distinct members = HLEN) |
| `P:user:<uid>` | hash | connection id -> worker id: the index from a user to their connections |
| `P:users` | hash | user id -> number of open connections (total users = HLEN) |
| `P:wconns:<wid>` | hash | connection id -> user id, for every connection a worker holds |
| `P:workers` | hash | worker id -> node id, every worker that may hold state |
| `P:alive:<wid>` | string, TTL | the worker's heartbeat; when it expires, any node sweeps the worker's state |
| `P:tasks` | stream | the task queue: one entry per job not yet finished (its id is the task id), consumer group `tasks` |
| `P:ban:<uid>` | string, TTL | a banned user: JSON `{"by", "reason", "until"}`; expires with the ban |
| `P:addr:{<ip>}` | hash | connection id -> worker id, for every connection (or handshake under way) of one client address, with `limits.connections_per_ip` on (an IPv6 client counts per /64) |
| `P:addrpace:{<ip>}` | string, TTL | the address's new-connection pace with `limits.connections_per_ip_per_minute` on: when (ms) its allowance is next whole (GCRA) |
| `P:waddrs:<wid>` | hash | connection id -> client address, for every slot of `P:addr:*` a worker holds: what a sweep gives back when the worker dies |
| `P:push:<app>:<channel>` | hash | subscriber connection id -> `""`, or on a presence channel the member as JSON `[user_id, user_info]` (Pusher endpoint) |
| `P:pushusers:<app>:<channel>` | hash | presence member user id -> that member's connections in the channel |
| `P:pushchans:<app>` | hash | channel -> its subscriptions, for every occupied channel of one Pusher app |
| `P:pushcache:<app>:<channel>` | string, TTL | the last event published on a cache channel, as sent |
| `P:hist:{<room>}` | stream, TTL | a room's last messages with `app.history` (`shoal.core.history`): entry id `<n>-0`, field `m`, the message's JSON without its closing brace |
| `P:histmeta:{<room>}` | hash, TTL | the room's history: `epoch` (a random id of the stream's life) and `n` (its last offset's count) |
| `P:task:<id>` | hash, TTL | a job's `attempts` once started, then its outcome: `state` (`done`/`failed`), `body` (msgpack), `name`, `conn`, `user` |

| channel | carries |
|---|---|
| `P:bus:all` | global broadcasts; every worker subscribes |
| `P:bus:w:<wid>` | messages for given connections on one worker |
| `P:bus:room:<name>` / `P:bus:chan:<name>` | room and channel messages; only workers with local members subscribe |
| `P:bus:push:<app>:<channel>` | events of one Pusher channel; likewise |

Each worker names its subscriber connection `P:sub:<wid>` (CLIENT SETNAME), so that every
worker can read the backlogs Redis holds for the deployment's subscribers.

Every key holds at most one hash, stream or string, and no command spans two keys but
the address check and the history's append, whose two keys share a hash tag (`{<ip>}`,
`{<room>}`), so the same layout works on Redis Cluster.
"""

from __future__ import annotations

from enum import Enum

ROOM_FIELD = "r:"
CHANNEL_FIELD = "c:"
PUSHER_FIELD = "p:"


class TopicKind(Enum):
    """A room notifies its members of joins and leaves; a channel is a room without that."""

    ROOM = "room"
    CHANNEL = "chan"

    @property
    def field_prefix(self) -> str:
        return ROOM_FIELD if self is TopicKind.ROOM else CHANNEL_FIELD


class Keys:
    """Key and channel names under one prefix."""

    __slots__ = ("bus_all", "prefix", "tasks", "users", "workers")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.users = f"{prefix}:users"
        self.workers = f"{prefix}:workers"
        self.tasks = f"{prefix}:tasks"
        self.bus_all = f"{prefix}:bus:all".encode()

    def conn(self, cid: str) -> str:
        return f"{self.prefix}:conn:{cid}"

    def topic(self, kind: TopicKind, name: str) -> str:
        return f"{self.prefix}:{kind.value}:{name}"

    def topic_users(self, kind: TopicKind, name: str) -> str:
        return f"{self.prefix}:{kind.value}users:{name}"

    def user(self, uid: str) -> str:
        return f"{self.prefix}:user:{uid}"

    def worker_conns(self, wid: str) -> str:
        return f"{self.prefix}:wconns:{wid}"

    def alive(self, wid: str) -> str:
        return f"{self.prefix}:alive:{wid}"

    def ban(self, uid: str) -> str:
        return f"{self.prefix}:ban:{uid}"

    def address(self, ip: str) -> str:
        return f"{self.prefix}:addr:{{{ip}}}"

    def address_pace(self, ip: str) -> str:
        return f"{self.prefix}:addrpace:{{{ip}}}"

    def worker_addresses(self, wid: str) -> str:
        return f"{self.prefix}:waddrs:{wid}"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def pusher_topic(self, app: str, channel: str) -> str:
        return f"{self.prefix}:push:{app}:{channel}"

    def pusher_members(self, app: str, channel: str) -> str:
        return f"{self.prefix}:pushusers:{app}:{channel}"

    def pusher_channels(self, app: str) -> str:
        return f"{self.prefix}:pushchans:{app}"

    def pusher_cache(self, app: str, channel: str) -> str:
        return f"{self.prefix}:pushcache:{app}:{channel}"

    def bus_pusher(self, app: str, channel: str) -> bytes:
        return f"{self.prefix}:bus:push:{app}:{channel}".encode()

    def history(self, room: str) -> str:
        return f"{self.prefix}:hist:{{{room}}}"

    def history_meta(self, room: str) -> str:
        return f"{self.prefix}:histmeta:{{{room}}}"

    def bus_worker(self, wid: str) -> bytes:
        return f"{self.prefix}:bus:w:{wid}".encode()

    def bus_client(self, wid: str) -> str:
        """The name of a worker's subscriber connection (CLIENT SETNAME)."""
        return f"{self.bus_clients}{wid}"

    @property
    def bus_clients(self) -> str:
        """What the names of every subscriber connection of the deployment start with."""
        return f"{self.prefix}:sub:"

    def bus_topic(self, kind: TopicKind, name: str) -> bytes:
        return f"{self.prefix}:bus:{kind.value}:{name}".encode()
