"""systemd's notify protocol (sd_notify(3)), spoken without libsystemd.

A service started with `Type=notify` finds in `NOTIFY_SOCKET` the address of an
AF_UNIX datagram socket: a path, or an abstract name written with a leading `@`. Each
notification is one datagram of newline-separated `KEY=VALUE` fields: `READY=1` once
the service serves, `RELOADING=1` (with `MONOTONIC_USEC=`) when a reload begins and
`READY=1` again when it ends, `STOPPING=1`, `STATUS=<one line for systemctl status>`,
and `WATCHDOG=1` at least once per `WATCHDOG_USEC` microseconds when the unit sets
`WatchdogSec=`.

systemd accepts these from the main process alone (`NotifyAccess=main`, the default),
so the master reads the variables once, before it forks or spawns anything, and removes
them from the environment, as `sd_notify(unset_environment=1)` does: no child, not even
an embedded redis-server (which speaks the protocol too when set to `supervised auto` or
`supervised systemd`), inherits the socket and notifies on the master's behalf.

Sending never raises: when systemd is gone or its queue is full the notification is
dropped, logged at debug level, and the service carries on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
# A notification waits at most this long for room in systemd's socket queue: the
# master's loop must not hang on a stuck service manager.
_SEND_TIMEOUT = 1.0


class Notifier:
    """Notifications to the service manager; every method is a no-op without one.

    Args:
        address: `NOTIFY_SOCKET` as systemd sets it (a path, or `@name` for an abstract
            socket); None when not started by a service manager.
        watchdog_interval: seconds within which systemd expects `WATCHDOG=1`; None
            when it watches nothing.

    Call `close()` when done.
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.watchdog_interval = watchdog_interval
        self._address = _socket_address(address) if address else None
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.settimeout(_SEND_TIMEOUT)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and remove them.

        Call it in the master before it starts any other process, so that none inherits
        them. The watchdog applies only if `WATCHDOG_PID`, when set, is this process.

        Args:
            environ: the environment to read and clean (default: `os.environ`, which
                also unsets the variables for processes started afterwards).
        """
        env = os.environ if environ is None else environ
        address = env.pop(NOTIFY_SOCKET, None)
        usec = env.pop(WATCHDOG_USEC, None)
        pid = env.pop(WATCHDOG_PID, None)
        return cls(address or None, _watchdog_interval(usec, pid))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._socket is not None

    def ready(self) -> None:
        """The service serves: start-up, or a reload, is complete."""
        self._send("READY=1")

    def reloading(self) -> None:
        """A reload begins; `ready()` must follow when it ends, aborted or not.

        `MONOTONIC_USEC` lets systemd (253 and newer) tell this reload from an older
        one it already saw.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """The service is stopping."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """One line of free text for `systemctl status` (newlines become spaces)."""
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Tell the watchdog the service is alive; send every `watchdog_interval / 2`."""
        self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            # systemd may be restarting, gone (the socket path with it), or too busy to
            # read: a notification is advice, and serving goes on without it.
            logger.debug("sd_notify %r not sent: %s", message, exc)


def _socket_address(address: str) -> str | bytes | None:
    """The `sendto` address of `NOTIFY_SOCKET`; None (and no notifications) if unusable."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    # sd_notify rejects anything else too (systemd 254 added vsock: addresses, which
    # only virtual machines' managers hand out).
    logger.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", address)
    return None


def _watchdog_interval(usec: str | None, pid: str | None) -> float | None:
    """Seconds from `WATCHDOG_USEC`, or None: unset, invalid, or meant for another pid."""
    if not usec:
        return None
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("WATCHDOG_PID=%r is not a pid; ignoring the watchdog", pid)
            return None
    try:
        micros = int(usec)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not a number; ignoring the watchdog", usec)
        return None
    return micros / 1_000_000 if micros > 0 else None
