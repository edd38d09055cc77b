"""`shoal reload`, `shoal stop` and `shoal status`: a running master, driven from outside.

The master is found through its pid file (`shoal.server.pidfile`) and observed through
the status file beside it (`shoal.server.status`): these commands send it a signal and
read what it writes, and never talk to its workers or to Redis.

Each command returns its exit status; errors are raised as `ShoalError` (`NotRunning`
when there is no master), for the caller to print.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import orjson

from shoal.core.errors import NotRunning, ShoalError, StatusUnavailable
from shoal.server import pidfile, status

EXIT_FAILED = 1
EXIT_STALE = 3
_POLL = 0.1


def reload(pid_file: Path, timeout: float, out: TextIO, err: TextIO) -> int:
    """SIGHUP the master, then wait for the reload it causes to finish.

    The reload is over when the status file shows a `last_reload` that began after the
    signal was sent and the master is `running` again.

    Returns:
        0 when it succeeded; `EXIT_FAILED` when it was aborted (its reason goes to `err`)
        or did not finish within `timeout` seconds.

    Raises:
        NotRunning: no master runs, or it exited during the reload.
    """
    pid = pidfile.read(pid_file)
    path = status.path_for(pid_file)
    requested = time.time()
    _signal(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    state = "unknown"
    while True:
        if not pidfile.is_master(pid):
            raise NotRunning(f"the master (pid {pid}) exited during the reload")
        snapshot = _read_own(path, pid)
        if snapshot is not None:
            state = snapshot.state
            done = snapshot.last_reload
            if done is not None and done.at >= requested and state == "running":
                if done.ok:
                    serving = [w.pid for w in snapshot.workers if w.state == "serving"]
                    out.write(
                        f"reloaded in {done.seconds:.1f} s: {len(serving)} workers serving "
                        f"(pids {', '.join(map(str, serving))})\n"
                    )
                    return 0
                err.write(
                    f"shoal: reload aborted after {done.seconds:.1f} s: "
                    f"{done.reason or 'no reason given'}; the previous workers still serve\n"
                )
                return EXIT_FAILED
        if time.monotonic() >= deadline:
            err.write(
                f"shoal: timed out after {timeout:g} s waiting for the reload of the master "
                f"(pid {pid}) to finish; its state: {state}\n"
            )
            return EXIT_FAILED
        time.sleep(_POLL)


def stop(pid_file: Path, timeout: float, out: TextIO, err: TextIO, *, now: bool = False) -> int:
    """Stop the master and wait until it is gone.

    Args:
        now: SIGQUIT, an immediate stop, instead of SIGTERM, a graceful one.

    Returns:
        0 once it is gone; `EXIT_FAILED` when it is still there after `timeout` seconds.

    Raises:
        NotRunning: no master runs.
    """
    pid = pidfile.read(pid_file)
    started = time.monotonic()
    _signal(pid, signal.SIGQUIT if now else signal.SIGTERM)
    while pidfile.is_master(pid):
        if time.monotonic() - started >= timeout:
            err.write(f"shoal: the master (pid {pid}) is still running after {timeout:g} s\n")
            return EXIT_FAILED
        time.sleep(_POLL)
    out.write(f"stopped the master (pid {pid}) in {time.monotonic() - started:.1f} s\n")
    return 0


def show(pid_file: Path, out: TextIO, err: TextIO, *, as_json: bool = False) -> int:
    """Print the master's status: a table, or with `as_json` the snapshot as JSON with
    `uptime` and `stale` added.

    Returns:
        0, or `EXIT_STALE` when the status file is missing, is older than
        `status.STALE_AFTER` seconds, or was left by another master.

    Raises:
        NotRunning: no master runs.
    """
    pid = pidfile.read(pid_file)
    path = status.path_for(pid_file)
    try:
        snapshot = status.read(path)
    except StatusUnavailable as exc:
        err.write(f"shoal: the master (pid {pid}) runs, but: {exc}\n")
        return EXIT_STALE
    now = time.time()
    stale = snapshot.stale(now) or snapshot.pid != pid
    if as_json:
        document = {
            **dataclasses.asdict(snapshot),
            "uptime": round(snapshot.uptime(now), 3),
            "stale": stale,
        }
        out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(render(snapshot, now, pid=pid))
    if stale:
        err.write(f"shoal: the status in {path} is stale\n")
        return EXIT_STALE
    return 0


def render(snapshot: status.Snapshot, now: float, *, pid: int) -> str:
    """The status as plain text: a headline, a table of workers, then the other
    processes, Redis, uptime and reloads. `pid` is the master the pid file names."""
    lines = [
        f"shoal node {snapshot.node}: {snapshot.state}, master pid {snapshot.pid}"
        + (f", {snapshot.listen}" if snapshot.listen else "")
    ]
    if snapshot.pid != pid:
        lines.append(
            f"STALE: this status was written by pid {snapshot.pid}, not by the running "
            f"master (pid {pid}), which has not written its own yet"
        )
    elif snapshot.stale(now):
        lines.append(
            f"STALE: the master last wrote its status {_duration(now - snapshot.updated_at)} "
            "ago: it may be stuck"
        )
    lines.append("")
    workers = sorted(snapshot.workers, key=lambda w: (w.slot, w.generation))
    rows = [
        [
            str(w.slot),
            str(w.pid),
            str(w.generation),
            w.state,
            _duration(now - w.started_at),
            f"{w.connections:,}",
            f"{w.messages:,}",
        ]
        for w in workers
    ]
    headers = ["SLOT", "PID", "GENERATION", "STATE", "AGE", "CONNECTIONS", "MESSAGES"]
    lines += _table(headers, rows, right={0, 1, 2, 4, 5, 6}) if rows else ["no workers"]
    lines.append("")
    keeper = snapshot.housekeeper
    pool = snapshot.task_pool
    redis = snapshot.redis
    up = {True: "up", False: "down", None: "unknown"}[redis.up]
    facts = [
        (
            "housekeeper",
            f"pid {keeper.pid}, up {_duration(now - keeper.started_at)}" if keeper else "none",
        ),
        (
            "task pool",
            f"pid {pool.pid}, {pool.processes} processes, up {_duration(now - pool.started_at)}"
            if pool
            else "none",
        ),
        ("redis", f"{redis.address}{' (embedded)' if redis.embedded else ''}: {up}"),
        ("uptime", _duration(snapshot.uptime(now))),
        ("reloads", _reloads(snapshot, now)),
    ]
    width = max(len(name) for name, _ in facts)
    lines += [f"{name:<{width}}  {value}" for name, value in facts]
    return "\n".join(lines) + "\n"


def _reloads(snapshot: status.Snapshot, now: float) -> str:
    last = snapshot.last_reload
    if last is None:
        return str(snapshot.reloads)
    outcome = "ok" if last.ok else f"aborted ({last.reason or 'no reason given'})"
    return (
        f"{snapshot.reloads}; the last {_duration(now - last.at)} ago: {outcome} "
        f"in {last.seconds:.1f} s"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned columns, two spaces apart; columns in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`, `4d03h`."""
    rest = max(0, int(seconds))
    if rest < 60:
        return f"{rest}s"
    minutes, rest = divmod(rest, 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _read_own(path: Path, pid: int) -> status.Snapshot | None:
    """The snapshot in `path` if master `pid` wrote it; None while it has not."""
    try:
        snapshot = status.read(path)
    except StatusUnavailable:
        return None
    return snapshot if snapshot.pid == pid else None


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError as exc:
        raise NotRunning(f"the master (pid {pid}) exited before it could be signalled") from exc
    except PermissionError as exc:
        raise ShoalError(
            f"not allowed to signal the master (pid {pid}): run this as the user it runs as"
        ) from exc
