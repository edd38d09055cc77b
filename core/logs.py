"""Logging for the master and its workers: text or JSON lines on stderr, one role per process."""

from __future__ import annotations

import logging
import sys
import time

import orjson
import setproctitle


class _RoleFilter(logging.Filter):
    role = "master"

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _RoleFilter.role
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, role, pid, logger, message (and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": getattr(record, "role", _RoleFilter.role),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup(level: str, fmt: str) -> None:
    """Configure the root logger once, in the master; forked workers inherit it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s [%(role)s %(process)d] %(name)s: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """Log at `level` from now on (a reload may change it)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; shoal answers those itself.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


def set_role(role: str) -> None:
    """Name this process in every later log line (`worker 2`) and in `ps` (`shoal: worker 2`)."""
    _RoleFilter.role = role
    setproctitle.setproctitle(f"shoal: {role}")
