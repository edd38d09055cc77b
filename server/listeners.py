"""The listening sockets of a WebSocket slot, which the master opens and keeps.

Each slot has its own SO_REUSEPORT socket per address `server.host` resolves to, so
the kernel spreads connections over the workers. The master holds them across the
life of the slot: a worker inherits its slot's sockets, and the next worker of the slot
(a reload, a respawn) accepts what the queue held meanwhile.
"""

from __future__ import annotations

import socket

from shoal.config.model import ServerConfig
from shoal.core.errors import ConfigError


def open_listeners(server: ServerConfig) -> list[socket.socket]:
    """Bind and listen on every address of `server.host`, port `server.port`.

    Raises:
        ConfigError: naming `server.host` or `server.port`.
    """
    try:
        infos = socket.getaddrinfo(
            server.host, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"server.host: cannot resolve {server.host!r}: {exc.strerror}") from exc
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Each address family gets its own socket, as asyncio does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(server.backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ConfigError(
            f"server.port: cannot listen on {server.host}:{server.port}: {exc.strerror}"
        ) from exc
    return socks
