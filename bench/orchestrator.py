"""Parent side of a run: spawns load processes, walks them through the phases,
samples the server around the measured window, and merges what they report.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from shoal.bench.drivers import DriverReport, check_templates
from shoal.bench.plan import RunPlan
from shoal.bench.probe import ProbeSample, ServerProbe
from shoal.bench.worker import (
    ConnectReport,
    ResumeReport,
    WorkerResult,
    timeline_step_ns,
    worker_main,
)

logger = logging.getLogger(__name__)

# Lead time between "start" being sent and t0, so every process starts together.
_START_LEAD_S = 0.2
# The server may free or allocate lazily right after the last handshake.
_MEMORY_SETTLE_S = 0.5

ProgressCallback = Callable[[str, float, int, int], None]
"""Called as (phase, elapsed_s, a, b): connecting: connected, failed; traffic: sent, received."""


class RunError(Exception):
    """The run could not be carried out (a load process failed, or time ran out)."""


@dataclass
class RunOutcome:
    """Merged raw results of one run (summarised by :mod:`shoal.bench.summary`)."""

    plan: RunPlan
    connect: ConnectReport = field(default_factory=ConnectReport)
    drops: Counter[str] = field(default_factory=Counter)
    traffic: DriverReport | None = None
    resume: ResumeReport | None = None
    sent_by_source: dict[int, int] = field(default_factory=dict)
    timeline_step_s: float = 0.0
    server_before: ProbeSample | None = None
    server_after: ProbeSample | None = None
    server_idle: ProbeSample | None = None


def run_plan(
    plan: RunPlan,
    probe: ServerProbe | None,
    progress: ProgressCallback,
    limit_s: float,
) -> RunOutcome:
    """Carry out ``plan`` within ``limit_s`` seconds or raise :class:`RunError`."""
    return _Run(plan, probe, progress, time.monotonic() + limit_s).execute()


class _Run:
    def __init__(
        self, plan: RunPlan, probe: ServerProbe | None, progress: ProgressCallback, deadline: float
    ) -> None:
        self.plan = plan
        self.probe = probe
        self.progress = progress
        self.deadline = deadline
        self.started = time.monotonic()
        self.outcome = RunOutcome(plan, timeline_step_s=timeline_step_ns(plan) / 1e9)
        self.pipes: list[Connection] = []
        self.procs: list[BaseProcess] = []
        self.phase = "connecting"
        self.counters: dict[int, tuple[int, int]] = {}
        self.pending: list[tuple[int, tuple[Any, ...]]] = []

    def execute(self) -> RunOutcome:
        # Once per run, here: the load processes pre-build their frames the same way, and
        # must not pay for the schema's validator at the moment they start sending.
        check_templates(self.plan)
        if self.probe is not None and self.plan.scenario == "connect":
            self.outcome.server_idle = self.probe.sample()
        context = multiprocessing.get_context("spawn")
        try:
            for indices in self.plan.slices():
                parent_end, child_end = context.Pipe()
                proc = context.Process(
                    target=worker_main, args=(child_end, self.plan, indices), daemon=True
                )
                proc.start()
                child_end.close()
                self.pipes.append(parent_end)
                self.procs.append(proc)
            self._phases()
        finally:
            self._shutdown()
        return self.outcome

    def _phases(self) -> None:
        outcome = self.outcome
        for report in self._collect("ready"):
            assert isinstance(report, ConnectReport)
            _merge_connect(outcome.connect, report)
        if self.plan.scenario == "connect" or outcome.connect.connected == 0:
            if self.probe is not None and outcome.connect.connected:
                time.sleep(_MEMORY_SETTLE_S)
                outcome.server_after = self.probe.sample()
            self._broadcast(("close",))
            return
        self.phase = "traffic"
        self.counters.clear()
        t0 = time.monotonic_ns() + int(_START_LEAD_S * 1e9)
        self._broadcast(("start", t0))
        window_start = t0 / 1e9 + self.plan.warmup
        self._pump_until(window_start)
        if self.probe is not None:
            outcome.server_before = self.probe.sample()
        self._pump_until(window_start + self.plan.duration)
        if self.probe is not None:
            outcome.server_after = self.probe.sample()
        self.phase = "draining"
        for sent in self._collect("sent"):
            assert isinstance(sent, dict)
            outcome.sent_by_source.update(sent)
        self._broadcast(("expect", outcome.sent_by_source))
        for result in self._collect("result"):
            assert isinstance(result, WorkerResult)
            outcome.drops.update(result.drops)
            if result.resume is not None:
                if outcome.resume is None:
                    outcome.resume = ResumeReport()
                outcome.resume.merge(result.resume)
            if result.traffic is not None:
                outcome.traffic = _merge_traffic(outcome.traffic, result.traffic)
        self._broadcast(("close",))

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def _pump_until(self, until_monotonic: float) -> None:
        """Handle progress until the given time; keep phase messages for ``_collect``.

        A process's clock may reach the end of the window a moment before ours,
        so its next phase message can arrive here.
        """
        while (now := time.monotonic()) < until_monotonic:
            self.pending.extend(self._receive(min(0.25, until_monotonic - now)))

    def _collect(self, tag: str) -> list[object]:
        """One ``tag`` message from every process, in process order."""
        results: dict[int, object] = {}
        while len(results) < len(self.pipes):
            arrived, self.pending = self.pending or self._receive(0.25), []
            for k, message in arrived:
                if message[0] != tag:
                    raise RunError(f"expected {tag!r} from a load process, got {message[0]!r}")
                results[k] = message[1]
        return [results[k] for k in sorted(results)]

    def _receive(self, wait_s: float) -> list[tuple[int, tuple[Any, ...]]]:
        if time.monotonic() > self.deadline:
            raise RunError("the run exceeded its overall time limit (--timeout)")
        out: list[tuple[int, tuple[Any, ...]]] = []
        for ready in wait(self.pipes, timeout=wait_s):
            assert isinstance(ready, Connection)
            k = self.pipes.index(ready)
            try:
                message = ready.recv()
            except EOFError:
                raise RunError(f"load process {k} exited unexpectedly") from None
            if message[0] == "error":
                raise RunError(f"load process {k} failed:\n{message[1]}")
            if message[0] == "progress":
                self.counters[k] = (message[1], message[2])
                a = sum(v[0] for v in self.counters.values())
                b = sum(v[1] for v in self.counters.values())
                self.progress(self.phase, time.monotonic() - self.started, a, b)
                continue
            out.append((k, message))
        return out

    def _shutdown(self) -> None:
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                logger.warning("load process %s did not exit; terminating it", proc.pid)
                proc.terminate()
                proc.join(timeout=2)
        for pipe in self.pipes:
            pipe.close()


def _merge_connect(total: ConnectReport, part: ConnectReport) -> None:
    first = total.attempted == 0
    total.attempted += part.attempted
    total.connected += part.connected
    total.failures.update(part.failures)
    total.handshake.merge(part.handshake)
    total.first_start_ns = (
        part.first_start_ns if first else min(total.first_start_ns, part.first_start_ns)
    )
    total.last_done_ns = max(total.last_done_ns, part.last_done_ns)


def _merge_traffic(total: DriverReport | None, part: DriverReport) -> DriverReport:
    if total is None:
        return part
    total.meter.merge(part.meter)
    if part.ledger is not None:
        if total.ledger is None:
            total.ledger = part.ledger
        else:
            total.ledger.merge(part.ledger)
    total.sent_by_source.update(part.sent_by_source)
    total.receivers.extend(part.receivers)
    total.mismatches += part.mismatches
    total.unanswered += part.unanswered
    total.server_errors.update(part.server_errors)
    return total
