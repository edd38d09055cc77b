"""A stand-in for the shoal master, for tests of `shoal reload|stop|status`.

It does what those commands rely on, and nothing else: it takes the title `shoal: master`,
writes its pid file with `shoal.server.pidfile`, rewrites its status file with
`shoal.server.status` every 0.1 s, and answers SIGHUP (a reload that succeeds, is
aborted, or never ends, as `--reload` says), SIGTERM (a stop that takes a moment) and
SIGQUIT (an immediate stop). It prints `ready` once its files are written, and the name
of each signal it handles.

    python fake_master.py PID_FILE [--reload ok|abort|hang] [--stale]
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import time
from pathlib import Path

import setproctitle

from shoal.server import pidfile, status

STEP = 0.3  # seconds a reload or a graceful stop takes


class FakeMaster:
    def __init__(self, pid_file: Path, reload: str, stale: bool) -> None:
        self.pid_file = pidfile.PidFile(pid_file)
        self.path = status.path_for(pid_file)
        self.reload = reload
        self.stale = stale
        self.started = time.time()
        self.state: status.State = "starting"
        self.generation = 1
        self.reloads = 0
        self.last_reload: status.Reload | None = None
        self.reload_began = 0.0
        self.stop_at: float | None = None
        self.signals: collections.deque[int] = collections.deque()

    def workers(self) -> tuple[status.Worker, ...]:
        return tuple(
            status.Worker(
                slot=slot,
                pid=10_000 * self.generation + slot,
                generation=self.generation,
                started_at=self.started,
                state="serving",
                connections=1200 + slot,
                messages=54_321,
            )
            for slot in range(2)
        )

    def snapshot(self, now: float) -> status.Snapshot:
        return status.Snapshot(
            pid=self.pid_file.pid or 0,
            node="fake01",
            started_at=self.started,
            updated_at=now - 60 if self.stale else now,
            state=self.state,
            listen="ws://127.0.0.1:9501/ws",
            workers=self.workers(),
            housekeeper=status.Housekeeper(pid=9001, started_at=self.started),
            task_pool=None,
            redis=status.Redis(address="127.0.0.1:6379", embedded=False, up=True),
            reloads=self.reloads,
            last_reload=self.last_reload,
        )

    def run(self) -> int:
        setproctitle.setproctitle("shoal: master")
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(signum, lambda signum, _frame: self.signals.append(signum))
        with self.pid_file:
            self.state = "running"
            status.write(self.path, self.snapshot(time.time()))
            print("ready", flush=True)
            while True:
                now = time.time()
                while self.signals:
                    signum = signal.Signals(self.signals.popleft())
                    print(signum.name, flush=True)
                    if signum == signal.SIGQUIT:
                        return 0
                    if signum == signal.SIGTERM:
                        self.state = "stopping"
                        self.stop_at = now + STEP
                    elif self.state == "running":
                        self.state = "reloading"
                        self.reload_began = now
                if self.stop_at is not None and now >= self.stop_at:
                    return 0
                if self.state == "reloading" and now >= self.reload_began + STEP:
                    self.finish_reload(now)
                if not self.stale:
                    status.write(self.path, self.snapshot(now))
                time.sleep(0.1)

    def finish_reload(self, now: float) -> None:
        if self.reload == "hang":
            return
        ok = self.reload == "ok"
        if ok:
            self.generation += 1
        self.reloads += 1
        self.last_reload = status.Reload(
            at=self.reload_began,
            ok=ok,
            seconds=now - self.reload_began,
            reason=None if ok else "worker 0 never became ready",
        )
        self.state = "running"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("pid_file", type=Path)
    parser.add_argument("--reload", choices=["ok", "abort", "hang"], default="ok")
    parser.add_argument("--stale", action="store_true")
    args = parser.parse_args()
    return FakeMaster(args.pid_file, args.reload, args.stale).run()


if __name__ == "__main__":
    sys.exit(main())
