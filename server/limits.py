"""The open-files limit: every client connection is a file descriptor.

A worker holds one descriptor per client, so the default soft limit of many systems
(1024) caps a worker at about a thousand clients, whatever `server.max_connection` says;
beyond it `accept()` fails with EMFILE. The master raises its soft limit before forking
(its children inherit it) and warns when the hard limit, which only root can raise, is
too low for the configuration.
"""

from __future__ import annotations

import logging
import math
import resource
from pathlib import Path

logger = logging.getLogger(__name__)

# Descriptors a worker needs besides its clients: its Redis connections (commands,
# pub/sub, one per blocking reader), the log and standard streams, the listening socket,
# the event loop's epoll and self-pipe, and the files an application opens.
HEADROOM = 1024
NR_OPEN = Path("/proc/sys/fs/nr_open")


def needed(max_connection: int, worker_num: int) -> int:
    """Descriptors one worker needs: its share of `max_connection` plus `HEADROOM`."""
    return math.ceil(max_connection / worker_num) + HEADROOM


def target(soft: int, hard: int, need: int, nr_open: int | None) -> int:
    """The soft limit to set: the hard limit; when the hard limit is unlimited, `need`,
    capped by the kernel's `nr_open` (when known). Never lower than `soft`."""
    infinity = resource.RLIM_INFINITY
    if soft == infinity:
        return soft
    if hard != infinity:
        return max(soft, hard)
    return max(soft, need if nr_open is None else min(need, nr_open))


def raise_nofile(max_connection: int, worker_num: int) -> str | None:
    """Raise this process's soft RLIMIT_NOFILE as far as allowed, for it and its children.

    Call it in the master before it forks.

    Returns:
        None when each worker can hold its share of `server.max_connection`; otherwise a
        warning for the log, saying the limit and how to raise it.
    """
    need = needed(max_connection, worker_num)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = target(soft, hard, need, _nr_open())
    if new != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as exc:
            logger.debug("cannot raise the open-files limit to %d: %s", new, exc)
            new = soft
        else:
            logger.debug("raised the open-files limit from %d to %d", soft, new)
    if new == resource.RLIM_INFINITY or new >= need:
        return None
    if hard == resource.RLIM_INFINITY:
        fix = f"raise the kernel's ceiling: sysctl fs.nr_open={need}"
    else:
        fix = (
            f"raise the hard limit: LimitNOFILE={need} in the systemd unit, minfds={need} "
            f"in supervisord.conf, or `ulimit -n {need}` in the shell that starts shoal "
            "(as root, or within /etc/security/limits.conf)"
        )
    return (
        f"open files: the limit is {new}, below the {need} each worker needs "
        f"(server.max_connection {max_connection} over server.worker_num {worker_num}, "
        f"plus {HEADROOM} for Redis, logs and the listener): a worker will fail to accept "
        f"clients (EMFILE) beyond about {max(0, new - HEADROOM)}. To fix it, {fix}; or "
        "lower server.max_connection"
    )


def _nr_open() -> int | None:
    """The kernel's ceiling on any process's open files (Linux), None elsewhere."""
    try:
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return None
