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

Rollouts (a reload, a task pool restart, a worker that reached `server.max_request`)
replace children one slot at a time, replacement first: the new child starts beside the
old one, and only once it is ready is the old one told to retire (`Retire`: it stops
accepting, closes its clients with 1012 and exits; its exit is expected and nothing
respawns). A replacement that dies or is not ready within `ready_timeout` aborts the
rollout: it is killed and the old children keep serving. A retiring child that has not
exited after `retire_timeout` is killed.

Scaling (SIGTTIN / SIGTTOU, or a reload that changes `server.worker_num`) adds a
WebSocket slot, or removes the highest one (`Drop`: its listener goes) and retires its
children.
"""

from __future__ import annotations

import collections
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
    replaces: int | None = None
    """The pid of the child this one replaces in a rollout; it serves until this is ready."""


@dataclass(frozen=True, slots=True)
class Signal:
    pid: int
    signum: int
    why: str
    expected: bool = False
    """Asked for (SIGQUIT): not worth an error line per child."""


@dataclass(frozen=True, slots=True)
class Retire:
    """Tell a child to finish and exit: it was replaced, or its slot is gone (`drain`:
    it accepts what its listener still holds before closing it)."""

    pid: int
    why: str
    reason: str = "reload"
    """What asked for it: `reload`, `max_request` or `scale`."""
    drain: bool = False


@dataclass(frozen=True, slots=True)
class Drop:
    """A WebSocket slot is gone: its listening socket must close."""

    slot: int


@dataclass(frozen=True, slots=True)
class Rolled:
    """A reload finished: every child it replaced is replaced (`ok`), or it was aborted."""

    ok: bool
    seconds: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str


Action = Spawn | Signal | Retire | Drop | Rolled | Fail


@dataclass(frozen=True, slots=True)
class Policy:
    """The tunables of supervision (from `server.*` in the config, and constants)."""

    worker_timeout: float = 30.0
    abort_grace: float = 3.0
    max_boot_failures: int = 5
    stable_after: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    ready_timeout: float = 30.0
    retire_timeout: float = 20.0


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
    replaces: int | None = None
    retiring_since: float | None = None
    abandoned: bool = False
    """A replacement given up on (its rollout aborted): its exit is expected."""
    recycle_after: float = 0.0
    """Its requests to be replaced wait until then (a replacement for it failed)."""

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
    respawn: bool = True


@dataclass(slots=True)
class _Reload:
    started: float
    again: tuple[Kind, ...] = ()
    """Asked for again while running: the kinds to roll once more when this one ends."""


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
    queue: collections.deque[tuple[Kind, int]] = field(default_factory=collections.deque)
    current: Child | None = None
    reloading: _Reload | None = None
    recycled: set[tuple[Kind, int]] = field(default_factory=set)

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
        child = Child(
            spawn.kind,
            spawn.slot,
            spawn.generation,
            pid,
            started=now,
            last_beat=now,
            replaces=spawn.replaces,
        )
        if spawn.replaces is not None:
            self.current = child
        if spawn.kind is Kind.REDIS:
            child.ready_at = now  # it has no heartbeat; the workers wait for it to answer
        self.children[pid] = child
        slot = self.slots.get((spawn.kind, spawn.slot))
        if slot is not None:
            slot.start_at = None
        return child

    def not_started(self, spawn: Spawn, now: float) -> list[Action]:
        """The master could not start `spawn` (its listener could not be opened)."""
        if spawn.replaces is not None:
            return self._abort(now, f"{spawn.kind.value} {spawn.slot} could not start")
        slot = self.slots.get((spawn.kind, spawn.slot))
        if slot is None or self.stopping:
            return []
        slot.failures += 1
        slot.start_at = now + max(self._backoff(slot.failures), self.policy.backoff_base)
        return []

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
            slot = self.slots.get((child.kind, child.slot))
            if slot is not None:
                slot.ever_ready = True
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
        if child.retiring_since is not None or child.abandoned:
            return Exit(child, expected=True), []
        if child is self.current:
            # A replacement that died before it was ready: the old child keeps serving.
            self.current = None
            return Exit(child, expected=False, respawn=False), self._abort(
                now, f"{child.kind.value} {child.slot} died while starting"
            )
        if self.current is not None and self.current.replaces == pid:
            # Its replacement is on its way: that one takes the slot.
            self.current.replaces = None
            return Exit(child, expected=False, respawn=False), []
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
        actions = self._due(now) + self._advance(now)
        for child in self.children.values():
            if child.kind is Kind.REDIS or child.killed:
                continue
            if (
                child.retiring_since is not None
                and now - child.retiring_since > self.policy.retire_timeout
            ):
                child.killed = True
                actions.append(
                    Signal(child.pid, signal.SIGKILL, "still retiring after its time to finish")
                )
            elif child.aborted_at is not None:
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

    # Rollouts

    def reload(self, now: float, kinds: tuple[Kind, ...]) -> list[Action]:
        """Replace every child of `kinds`, one slot at a time (see the module's docstring).

        A reload asked for while one runs is done again once it ends, so that children
        started before the second request do not keep what it changed.
        """
        if self.stopping:
            return []
        if self.reloading is not None:
            self.reloading.again += tuple(k for k in kinds if k not in self.reloading.again)
            return []
        self.reloading = _Reload(started=now)
        self.generation += 1
        self._enqueue(kinds)
        return self._advance(now)

    def recycle(self, pid: int, now: float) -> list[Action]:
        """Replace the child `pid` (it asked to be: `server.max_request`)."""
        child = self.children.get(pid)
        if (
            self.stopping
            or child is None
            or child.retiring_since is not None
            or child.ready_at is None
            or child is self.current
            or now < child.recycle_after
            or (child.kind, child.slot) in self.queue
            or (self.current is not None and self.current.replaces == pid)
        ):
            return []
        self.queue.append((child.kind, child.slot))
        self.recycled.add((child.kind, child.slot))
        return self._advance(now)

    def _enqueue(self, kinds: tuple[Kind, ...]) -> None:
        for kind in kinds:
            for key in sorted(k for k in self.slots if k[0] is kind):
                if key not in self.queue:
                    self.queue.append(key)

    def _advance(self, now: float) -> list[Action]:
        """Move the rollout on: retire what a ready replacement replaces, start the next."""
        actions: list[Action] = []
        new = self.current
        if new is not None:
            if new.ready_at is not None:
                self.current = None
                old = self.children.get(new.replaces) if new.replaces is not None else None
                new.replaces = None  # it serves the slot now, like any other child
                key = (new.kind, new.slot)
                reason = "max_request" if key in self.recycled else "reload"
                self.recycled.discard(key)
                if old is not None:
                    actions.append(self._retire(old, now, f"replaced by {new.name}", reason))
            elif now - new.started > self.policy.ready_timeout:
                self.current = None
                new.abandoned = new.killed = True
                actions.append(Signal(new.pid, signal.SIGKILL, "not ready in time"))
                return actions + self._abort(
                    now,
                    f"{new.name} was not ready within {self.policy.ready_timeout:.0f} s",
                )
            else:
                return actions
        while self.queue:
            key = self.queue.popleft()
            old = self._serving(key)
            if key in self.slots and old is not None:
                actions.append(Spawn(key[0], key[1], self.generation, replaces=old.pid))
                return actions
        if self.reloading is not None:
            reload, self.reloading = self.reloading, None
            actions.append(Rolled(ok=True, seconds=now - reload.started))
            if reload.again:
                actions += self.reload(now, reload.again)
        return actions

    def _abort(self, now: float, reason: str) -> list[Action]:
        """A replacement failed: leave the rest as it is."""
        self.queue.clear()
        self.recycled.clear()
        for child in self.children.values():
            if child.retiring_since is None:
                child.recycle_after = now + self.policy.backoff_cap
        if self.reloading is None:
            return []
        reload, self.reloading = self.reloading, None
        return [Rolled(ok=False, seconds=now - reload.started, reason=reason)]

    def _serving(self, key: tuple[Kind, int]) -> Child | None:
        """The child that serves a slot now (not one retiring or being given up on)."""
        for child in self.children.values():
            if (
                (child.kind, child.slot) == key
                and child.retiring_since is None
                and not child.abandoned
                and child is not self.current
            ):
                return child
        return None

    def _retire(
        self, child: Child, now: float, why: str, reason: str, *, drain: bool = False
    ) -> Retire:
        child.retiring_since = now
        child.told_to_stop = True
        return Retire(child.pid, why, reason, drain)

    # Scaling

    def worker_slots(self) -> list[int]:
        return sorted(index for kind, index in self.slots if kind is Kind.WEBSOCKET)

    def scale(self, now: float, workers: int) -> list[Action]:
        """Run `workers` WebSocket slots: add the next ones, or remove the highest."""
        if self.stopping:
            return []
        actions: list[Action] = []
        slots = self.worker_slots()
        for index in range(
            max(slots, default=-1) + 1, max(slots, default=-1) + 1 + workers - len(slots)
        ):
            self.slots[(Kind.WEBSOCKET, index)] = _Slot()
            actions.append(Spawn(Kind.WEBSOCKET, index, self.generation))
        for index in reversed(slots[workers:]):
            del self.slots[(Kind.WEBSOCKET, index)]
            actions.append(Drop(index))
            for child in list(self.children.values()):
                if (child.kind, child.slot) != (Kind.WEBSOCKET, index):
                    continue
                if child is self.current:
                    self.current = None
                if child.retiring_since is None:
                    actions.append(
                        self._retire(child, now, "its slot was removed", "scale", drain=True)
                    )
        self.plan[Kind.WEBSOCKET] = workers
        return actions + self._advance(now)

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

    def kill(self, now: float) -> list[Action]:
        """Stop at once: SIGKILL for every child (SIGQUIT)."""
        if not self.stopping:
            self.stop(now, 0.0)  # its SIGTERMs are not needed: SIGKILL follows
        return self._kill_all("stopping at once", expected=True)

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

    def _kill_all(self, why: str, *, expected: bool = False) -> list[Action]:
        actions: list[Action] = []
        for child in self.children.values():
            if not child.killed:
                child.killed = True
                actions.append(Signal(child.pid, signal.SIGKILL, why, expected))
        return actions
