"""Server resource sampling: CPU seconds, RSS and PSS of process trees.

Each ``--server-pid`` is expanded to itself plus all of its descendants at
sampling time (multi-process servers fork workers). CPU is user+system time
of the live processes; RSS double-counts pages shared between forked workers,
so PSS (from ``/proc/PID/smaps_rollup``, which charges each shared page
proportionally) is reported as well when readable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # ships no type information

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSample:
    """One reading of the whole set of server process trees."""

    processes: int
    cpu_seconds: float
    rss_bytes: int
    pss_bytes: int | None


class ServerProbe:
    """Samples the process trees rooted at the given pids."""

    def __init__(self, pids: list[int]) -> None:
        for pid in pids:
            if not psutil.pid_exists(pid):
                raise ValueError(f"server pid {pid} does not exist")
        self.pids = pids

    def sample(self) -> ProbeSample:
        """Sum CPU, RSS and PSS over every live process of every tree."""
        cpu = 0.0
        rss = 0
        pss: int | None = 0
        count = 0
        for proc in self._processes():
            try:
                times = proc.cpu_times()
                memory = proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            count += 1
            cpu += times.user + times.system
            rss += memory.rss
            proc_pss = _pss_bytes(proc.pid)
            pss = None if pss is None or proc_pss is None else pss + proc_pss
        return ProbeSample(count, cpu, rss, pss)

    def _processes(self) -> list[psutil.Process]:
        seen: dict[int, psutil.Process] = {}
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    seen.setdefault(proc.pid, proc)
            except psutil.NoSuchProcess:
                logger.warning("server pid %s has exited", pid)
        return list(seen.values())


def _pss_bytes(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None
