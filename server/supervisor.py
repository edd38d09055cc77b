"""The master's supervision policy, as pure code: which children to start, respawn,
abort, kill, and when to give up. No fork, no signal, no clock.

The master (`shoal.server.master`) carries out what this decides: it reports what it
observed (a child started, exited, beat its heartbeat) and executes the actions it gets
back. That keeps every rule here testable without a process (tests/unit).

Children have a kind and a slot: `worker_num` WebSocket workers, one housekeeper, the
task pool when `tasks.task_worker_num` asks for one, and the embedded Redis when there
is one (`shoal tasks` runs a task pool alone). Each start of a slot is a new child with a new
generation number, so that a reload can tell the old from the new.

Rules:

- A child that dies is started again in its slot. The first respawn after a stable run
  is immediate; a slot that keeps dying is a crash loop and waits an exponentially
  growing, jittered delay (up to `backoff_cap`) before each next start.
- A WebSocket worker or task pool that exits with `EXIT_BOOT` cannot start for a reason
  retrying will not fix (port taken, application import failed): the node stops.
- When every WebSocket slot has died `max_boot_failures` times in a row without ever
  becoming ready, the node stops too: nothing is serving, and nothing will.
- A child whose heartbeat is older than `worker_timeout` is stuck: it gets SIGABRT first,
  so that its traceback reaches the log, then SIGKILL after `abort_grace` seconds.
- On stop, every child but the embedded Redis gets SIGTERM; Redis gets it once the
  others are gone (they remove their state on the way out); past the deadline,
  everything left gets SIGKILL.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from enum import Enum


class Kind(Enum):
    WEBSOCKET = "worker"
    HOUSEKEEPER = "housekeeper"
    TASKS = "task pool"
    REDIS = "embedded redis"


@dataclass(frozen=True, slots=True)
class Spawn:
    kind: Kind
    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class Signal:
    pid: int
    signum: int
    why: str


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str


Action = Spawn | Signal | Fail


@dataclass(frozen=True, slots=True)
class Policy:
    """The tunables of supervision (from `server.*` in the config, and constants)."""

    worker_timeout: float = 30.0
    abort_grace: float = 3.0
    max_boot_failures: int = 5
    stable_after: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0


@dataclass(slots=True)
class Child:
    kind: Kind
    slot: int
    generation: int
    pid: int
    started: float
    ready_at: float | None = None
    last_beat: float = 0.0
    aborted_at: float | None = None
    killed: bool = False
    told_to_stop: bool = False

    @property
    def name(self) -> str:
        """`worker 2 (pid 4242)`; kinds with one slot go without its number."""
        slot = f" {self.slot}" if self.kind is Kind.WEBSOCKET else ""
        return f"{self.kind.value}{slot} (pid {self.pid})"


@dataclass(slots=True)
class _Slot:
    failures: int = 0
    ever_ready: bool = False
    start_at: float | None = None  # a respawn is due at this time


@dataclass(slots=True)
class Exit:
    """How the master should describe an exit, and what follows from it."""

    child: Child
    expected: bool
    crash_loop: bool = False
    delay: float = 0.0


@dataclass
class Supervisor:
    """The state of every child of one master, and the rules above.

    Args:
        plan: how many slots of each kind to keep running.
        policy: the tunables.
        boot_exit: the exit status that means "cannot start, do not retry".
        rng: the random source for backoff jitter (seeded in tests).
    """

    plan: dict[Kind, int]
    policy: Policy = field(default_factory=Policy)
    boot_exit: int = 3
    rng: random.Random = field(default_factory=random.Random)
    children: dict[int, Child] = field(default_factory=dict)
    slots: dict[tuple[Kind, int], _Slot] = field(default_factory=dict)
    generation: int = 1
    stopping: bool = False
    stop_deadline: float = 0.0
    failure: str | None = None

    def start(self, now: float) -> list[Action]:
        """The first children to start; Redis first, so the others find it."""
        order = sorted(self.plan, key=lambda kind: kind is not Kind.REDIS)
        actions: list[Action] = []
        for kind in order:
            for slot in range(self.plan[kind]):
                self.slots[(kind, slot)] = _Slot()
                actions.append(Spawn(kind, slot, self.generation))
        return actions

    def started(self, spawn: Spawn, pid: int, now: float) -> Child:
        """The master forked `spawn` as `pid`."""
        child = Child(spawn.kind, spawn.slot, spawn.generation, pid, started=now, last_beat=now)
        if spawn.kind is Kind.REDIS:
            child.ready_at = now  # it has no heartbeat; the workers wait for it to answer
        self.children[pid] = child
        self.slots[(spawn.kind, spawn.slot)].start_at = None
        return child

    def running(self) -> bool:
        """False once stopping and every child has exited."""
        return not self.stopping or bool(self.children)

    # Observations

    def observe(self, pid: int, *, ready: bool, beat: float) -> None:
        """What the scoreboard says of a child now."""
        child = self.children.get(pid)
        if child is None:
            return
        if ready and child.ready_at is None:
            child.ready_at = beat
            self.slots[(child.kind, child.slot)].ever_ready = True
        child.last_beat = max(child.last_beat, beat)

    def exited(self, pid: int, code: int, now: float) -> tuple[Exit | None, list[Action]]:
        """A child exited with `code` (negative: killed by that signal).

        Returns how to describe it (None for a pid that is not a known child, such as a
        stray grandchild reaped as PID 1) and what to do next.
        """
        child = self.children.pop(pid, None)
        if child is None:
            return None, []
        if self.stopping:
            return Exit(child, expected=True), self._stop_redis_last()
        slot = self.slots[(child.kind, child.slot)]
        if child.kind in (Kind.WEBSOCKET, Kind.TASKS) and code == self.boot_exit:
            return Exit(child, expected=False), self._fail(
                f"{child.kind.value} {child.slot} could not start (see its error above)"
            )
        ran = now - (child.ready_at if child.ready_at is not None else now)
        if child.ready_at is not None and ran >= self.policy.stable_after:
            slot.failures = 0
        slot.failures += 1
        if child.ready_at is None and child.kind is Kind.WEBSOCKET and self._all_failing():
            return Exit(child, expected=False), self._fail(
                f"every worker died while starting, {self.policy.max_boot_failures} times in a row"
            )
        delay = self._backoff(slot.failures)
        slot.start_at = now + delay
        return Exit(child, expected=False, crash_loop=delay > 0, delay=delay), self._due(now)

    def _all_failing(self) -> bool:
        worker_slots = [slot for (kind, _), slot in self.slots.items() if kind is Kind.WEBSOCKET]
        return all(
            slot.failures >= self.policy.max_boot_failures and not slot.ever_ready
            for slot in worker_slots
        )

    def _backoff(self, failures: int) -> float:
        if failures <= 1:
            return 0.0
        # The exponent stops growing long before float overflow (2**1024): the cap rules.
        doublings = min(failures - 2, 64)
        ceiling = min(self.policy.backoff_cap, self.policy.backoff_base * 2.0**doublings)
        # Half fixed, half jittered: a crash loop must slow down, not just spread out.
        return ceiling * float(self.rng.uniform(0.5, 1.0))

    # Time passing

    def tick(self, now: float) -> list[Action]:
        """What is due now: respawns whose backoff ended, stuck children, the stop deadline."""
        if self.stopping:
            if now <= self.stop_deadline:
                return []
            return self._kill_all("still running after server.shutdown_timeout")
        actions = self._due(now)
        for child in self.children.values():
            if child.kind is Kind.REDIS or child.killed:
                continue
            if child.aborted_at is not None:
                if now - child.aborted_at > self.policy.abort_grace:
                    child.killed = True
                    actions.append(Signal(child.pid, signal.SIGKILL, "did not exit after SIGABRT"))
            elif now - child.last_beat > self.policy.worker_timeout:
                child.aborted_at = now
                actions.append(
                    Signal(
                        child.pid,
                        signal.SIGABRT,
                        f"silent for {now - child.last_beat:.0f} s (server.worker_timeout)",
                    )
                )
        return actions

    def _due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for (kind, index), slot in self.slots.items():
            if slot.start_at is not None and slot.start_at <= now:
                slot.start_at = None
                actions.append(Spawn(kind, index, self.generation))
        return actions

    # Stopping

    def stop(self, now: float, timeout: float) -> list[Action]:
        """Stop gracefully within `timeout` seconds. Calling it again kills at once."""
        if self.stopping:
            return self._kill_all("stopped twice")
        self.stopping = True
        self.stop_deadline = now + timeout
        for slot in self.slots.values():
            slot.start_at = None
        actions: list[Action] = []
        for child in self.children.values():
            if child.kind is not Kind.REDIS:
                child.told_to_stop = True
                actions.append(Signal(child.pid, signal.SIGTERM, "stopping"))
        return actions + self._stop_redis_last()

    def _stop_redis_last(self) -> list[Action]:
        others = [c for c in self.children.values() if c.kind is not Kind.REDIS]
        if others:
            return []
        actions: list[Action] = []
        for child in self.children.values():
            if not child.told_to_stop:
                child.told_to_stop = True
                actions.append(Signal(child.pid, signal.SIGTERM, "stopping"))
        return actions

    def _fail(self, reason: str) -> list[Action]:
        if self.failure is None:
            self.failure = reason
        return [Fail(reason)]

    def _kill_all(self, why: str) -> list[Action]:
        actions: list[Action] = []
        for child in self.children.values():
            if not child.killed:
                child.killed = True
                actions.append(Signal(child.pid, signal.SIGKILL, why))
        return actions
