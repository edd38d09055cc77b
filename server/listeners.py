"""The listening sockets of a WebSocket slot, which the master opens and keeps.

Each slot has its own SO_REUSEPORT socket per address `server.host` resolves to, so
the kernel spreads connections over the workers; likewise for the admin listener
(`server.admin_host`, `server.admin_port`) when there is one. The master holds them across the
life of the slot: a worker inherits its slot's sockets, and the next worker of the slot
(a reload, a respawn) accepts what the queue held meanwhile.
"""

from __future__ import annotations

import socket

from shoal.config.model import ServerConfig
from shoal.core.errors import ConfigError


def open_listeners(server: ServerConfig) -> list[socket.socket]:
    """Bind and listen on every address of `server.host`, port `server.port`, and of
    `server.admin_host`, port `server.admin_port` when it is set (`is_admin()` tells
    them apart).

    Raises:
        ConfigError: naming the key at fault.
    """
    socks = _open(server.host, server.port, server.backlog, "server.host", "server.port")
    if server.admin_port is not None:
        try:
            socks += _open(server.admin_host, server.admin_port, server.backlog,
                           "server.admin_host", "server.admin_port")  # fmt: skip
        except ConfigError:
            for sock in socks:
                sock.close()
            raise
    return socks


def is_admin(sock: socket.socket, server: ServerConfig) -> bool:
    """Whether `sock` is one of the admin listener's."""
    return server.admin_port is not None and sock.getsockname()[1] == server.admin_port


def _open(host: str, port: int, backlog: int, host_key: str, port_key: str) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{host_key}: cannot resolve {host!r}: {exc.strerror}") from exc
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
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ConfigError(f"{port_key}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    return socks
