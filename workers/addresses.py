"""Who a connection comes from, and how many connections each client address may hold
and open: `server.trusted_proxies`, `limits.connections_per_ip` and
`limits.connections_per_ip_per_minute`.

The counts live in Redis, so that spreading connections over workers or nodes does not
evade them. Each connection of an address holds a slot, `P:addr:{ip}` (connection id ->
worker id), taken by one script that checks both limits and reserves the slot at once:
Redis runs scripts one at a time, so parallel handshakes from one address, on any
worker of any node, never exceed `connections_per_ip`. The same round trip writes the
slot into the worker's index, `P:waddrs:<wid>`, first: whatever becomes of the
connection, its slot is given back, by the worker when the transport is gone
(`release()`), or by the sweep of a worker that died (`shoal.core.registry.forget_worker`).

With both limits at 0 (the default) nothing here touches Redis and the handshake costs
no round trip.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from shoal.config.model import LimitsConfig, ServerConfig
from shoal.core import registry
from shoal.core.keys import Keys

Command = tuple[Any, ...]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Checks both limits, then takes a slot; nothing is taken or spent when refused (but a
# refused attempt spends its place in the pace: a client hammering at the limit stays
# refused, rather than getting every freed place first).
# KEYS: the address's slots (hash), its pace (string: GCRA's theoretical arrival time,
# ms). ARGV: the concurrent cap (0: none), the per-minute rate (0: none), connection id,
# worker id. Returns {0} (admitted), {1} (over the cap) or {2, seconds to wait}.
# The clock is Redis's own (TIME): every worker and node reads the same one.
_RESERVE = """
local cap, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
if cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then return {1} end
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tat = tonumber(redis.call('GET', KEYS[2]) or 0)
  if tat < now then tat = now end
  local next = tat + math.floor(60000 / rate)
  if next - now > 60000 then return {2, math.ceil((next - 60000 - now) / 1000)} end
  redis.call('SET', KEYS[2], next, 'PX', next - now)
end
if cap > 0 then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
return {0}
"""
OVER_CAP = 1
OVER_RATE = 2
BUSY_RETRY_AFTER = 5
"""`Retry-After` (seconds) of a handshake refused for the concurrent cap: when a slot
frees is unknown."""


def client_address(peer: str, forwarded: Iterable[str], trusted: Sequence[Network]) -> str:
    """The client's address: the TCP peer's, or, when the peer is a trusted proxy, the
    right-most address of `X-Forwarded-For` that is not itself trusted (as nginx's
    `real_ip_recursive`). An entry that is not an address ends the walk: the proxy that
    added it is the client as far as shoal can tell.

    Args:
        peer: the TCP peer's host.
        forwarded: the values of every `X-Forwarded-For` header, in order.
        trusted: `server.trusted_proxies`.
    """
    address = peer
    if not _is_trusted(address, trusted):
        return address
    hops = [hop.strip() for value in forwarded for hop in value.split(",")]
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return address
        address = str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else hop
        if not _is_trusted(address, trusted):
            return address
    return address


def _is_trusted(host: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)


def counted_as(host: str) -> str:
    """What the limits count a client address as: itself, or its /64 for IPv6 (one
    host usually holds a whole /64, so per address would be no limit at all)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class Addresses:
    """The address limits of one worker.

    Args:
        server: the `server` section (`trusted_proxies`).
        limits: the `limits` section.
        keys: Redis key names.
        worker_id: this worker's id, the owner of the slots it takes.
    """

    def __init__(
        self, server: ServerConfig, limits: LimitsConfig, keys: Keys, worker_id: str
    ) -> None:
        self.trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in server.trusted_proxies
        )
        self.cap = limits.connections_per_ip
        self.rate = limits.connections_per_ip_per_minute
        self.keys = keys
        self.worker_id = worker_id

    @property
    def limited(self) -> bool:
        """Whether a handshake takes a slot (a Redis round trip)."""
        return bool(self.cap or self.rate)

    def client(self, peer: str, forwarded: Iterable[str]) -> str | None:
        """The client's address when a trusted proxy forwarded it, else None (the peer)."""
        if not self.trusted:
            return None
        address = client_address(peer, forwarded, self.trusted)
        return None if address == peer else address

    def reserve(self, ip: str, cid: str) -> list[Command]:
        """The commands that take a slot of `ip` (as `counted_as()`) for `cid`; their
        last reply goes to `refusal()`. Whatever it answers, `release()` must follow when
        the connection is gone."""
        keys = self.keys
        return [
            ("HSET", keys.worker_addresses(self.worker_id), cid, ip),
            ("EVAL", _RESERVE, 2, keys.address(ip), keys.address_pace(ip),
             self.cap, self.rate, cid, self.worker_id),
        ]  # fmt: skip

    def refusal(self, reply: list[int]) -> tuple[str, int, int] | None:
        """Why the reply to `reserve()` refuses the handshake: (reason, the limit,
        seconds to wait), or None."""
        if reply[0] == OVER_CAP:
            return "connections_per_ip", self.cap, BUSY_RETRY_AFTER
        if reply[0] == OVER_RATE:
            return "connections_per_ip_per_minute", self.rate, max(1, int(reply[1]))
        return None

    def release(self, ip: str, cid: str) -> list[Command]:
        """The commands that give `cid`'s slot back (idempotent)."""
        return registry.release_address(self.keys, self.worker_id, ip, cid)
