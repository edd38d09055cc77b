"""File-descriptor limit: raise the soft RLIMIT_NOFILE to what the run needs."""

from __future__ import annotations

import resource

# Descriptors a load process uses besides its sockets (pipes, epoll, stdio, imports).
FD_OVERHEAD = 64


class FdLimitError(Exception):
    """The hard limit is too low for the requested connection count."""


def ensure_fd_limit(needed: int) -> int:
    """Raise the soft limit to at least ``needed`` (inherited by load processes).

    Returns the resulting soft limit; raises :class:`FdLimitError` when even the
    hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FdLimitError(
            f"this run needs {needed} file descriptors per process but the hard limit is "
            f"{hard}; raise it (ulimit -Hn, /etc/security/limits.conf) or use more --processes"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed
