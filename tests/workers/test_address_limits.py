"""Which address a connection counts as: `server.trusted_proxies` and X-Forwarded-For."""

from __future__ import annotations

import ipaddress

import pytest

from shoal.workers.addresses import client_address, counted_as

TRUSTED = (ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # An untrusted peer's header is the client's own word: ignored.
        ("192.0.2.1", ["203.0.113.7"], "192.0.2.1"),
        # A trusted peer: the right-most address not itself trusted.
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["1.1.1.1, 203.0.113.7, 10.1.2.3"], "203.0.113.7"),
        ("127.0.0.1", ["1.1.1.1, 203.0.113.7", "10.1.2.3"], "203.0.113.7"),
        # No header, or only trusted hops: the left-most trusted one.
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["10.0.0.9, 10.1.2.3"], "10.0.0.9"),
        # Garbage ends the walk at the proxy that passed it on.
        ("127.0.0.1", ["203.0.113.7, not-an-ip, 10.1.2.3"], "10.1.2.3"),
        ("127.0.0.1", ["203.0.113.7:4444"], "127.0.0.1"),
        # IPv4-mapped IPv6 is the IPv4 address, peer and hop alike.
        ("::ffff:127.0.0.1", ["::ffff:203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], client: str) -> None:
    assert client_address(peer, forwarded, TRUSTED) == client


def test_no_trusted_proxies_no_header() -> None:
    assert client_address("127.0.0.1", ["203.0.113.7"], ()) == "127.0.0.1"


def test_ipv6_counts_per_64() -> None:
    assert counted_as("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert counted_as("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert counted_as("::ffff:192.0.2.1") == "192.0.2.1"
    assert counted_as("192.0.2.1") == "192.0.2.1"
