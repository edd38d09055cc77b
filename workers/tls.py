"""TLS for `wss://` served by the workers themselves (`server.ssl_cert_file` and
`server.ssl_key_file`), for deployments without a proxy in front.

The context is built in each worker, after the fork, from the files as they are then:
a reload (SIGHUP) picks up a renewed certificate. The master and `shoal check-config`
build one first, so that a missing file or a key that does not match stops the start
(or the reload) with an error naming the key.
"""

from __future__ import annotations

import ssl

from shoal.config.model import ServerConfig
from shoal.core.errors import ConfigError


def context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context; None when it serves plain `ws://`.

    Raises:
        ConfigError: naming `server.ssl_cert_file` or `server.ssl_key_file`.
    """
    if server.ssl_cert_file is None or server.ssl_key_file is None:
        return None
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        tls.load_cert_chain(server.ssl_cert_file, server.ssl_key_file)
    except FileNotFoundError as exc:
        key = "ssl_cert_file" if exc.filename == server.ssl_cert_file else "ssl_key_file"
        raise ConfigError(f"server.{key}: no such file: {exc.filename}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server.ssl_cert_file, server.ssl_key_file: cannot load the certificate and "
            f"its key ({server.ssl_cert_file}, {server.ssl_key_file}): {exc}"
        ) from exc
    return tls


def scheme(server: ServerConfig) -> str:
    """`wss` when the workers serve TLS, else `ws`."""
    return "wss" if server.ssl_cert_file is not None else "ws"
