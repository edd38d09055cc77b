"""The master's supervision policy as pure code: observations in, actions out.

Every test feeds explicit `now` values and a seeded random source, so each rule of
`shoal.server.supervisor` is checked without a process, a signal or a clock.
"""

from __future__ import annotations

import random
import signal

import pytest

from shoal.server.supervisor import (
    Action,
    Drop,
    Exit,
    Fail,
    Kind,
    Policy,
    Retire,
    Rolled,
    Signal,
    Spawn,
    Supervisor,
)

POLICY = Policy(
    worker_timeout=30.0,
    abort_grace=3.0,
    max_boot_failures=3,
    stable_after=10.0,
    backoff_base=0.5,
    backoff_cap=4.0,
)
# Ceilings of the crash-loop delay for the 2nd, 3rd, ... failure in a row with POLICY:
# base * 2 ** (failures - 2), capped at backoff_cap.
CEILINGS = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


class Node:
    """A supervisor and the pids the test hands out for what it spawns, as the master does."""

    def __init__(self, plan: dict[Kind, int], policy: Policy = POLICY, seed: int = 7) -> None:
        self.sup = Supervisor(plan, policy, rng=random.Random(seed))
        self.next_pid = 100
        self.pids: dict[tuple[Kind, int], int] = {}

    def boot(self, now: float = 0.0) -> list[Spawn]:
        """Start every first child at `now`; returns the spawns in the order asked for."""
        spawns = spawns_of(self.sup.start(now))
        self.spawn(spawns, now)
        return spawns

    def spawn(self, spawns: list[Spawn], now: float) -> None:
        for action in spawns:
            self.next_pid += 1
            self.sup.started(action, self.next_pid, now)
            self.pids[(action.kind, action.slot)] = self.next_pid

    def pid(self, kind: Kind, slot: int = 0) -> int:
        return self.pids[(kind, slot)]

    def ready(self, kind: Kind, slot: int, now: float) -> None:
        self.sup.observe(self.pid(kind, slot), ready=True, beat=now)

    def die(self, kind: Kind, slot: int, now: float, code: int = 1) -> tuple[Exit, list[Action]]:
        exit_, actions = self.sup.exited(self.pid(kind, slot), code, now)
        assert exit_ is not None
        return exit_, actions

    def crash(self, kind: Kind, slot: int, now: float) -> tuple[Exit, float]:
        """The child in a slot dies at `now` and is started again once its respawn is due.

        Returns the exit and the time of the respawn.
        """
        exit_, actions = self.die(kind, slot, now)
        later = now + exit_.delay
        # Due at once, a respawn comes with the exit; otherwise from the tick that ends its delay.
        self.spawn(spawns_of(actions or self.sup.tick(later)), later)
        return exit_, later


def spawns_of(actions: list[Action]) -> list[Spawn]:
    """The actions, which must all be spawns."""
    spawns = [a for a in actions if isinstance(a, Spawn)]
    assert len(spawns) == len(actions), actions
    return spawns


def test_start_spawns_embedded_redis_first_then_every_slot() -> None:
    """Redis starts before the others, whatever the order of the plan, so they find it."""
    node = Node({Kind.WEBSOCKET: 2, Kind.HOUSEKEEPER: 1, Kind.REDIS: 1})
    assert node.boot() == [
        Spawn(Kind.REDIS, 0, 1),
        Spawn(Kind.WEBSOCKET, 0, 1),
        Spawn(Kind.WEBSOCKET, 1, 1),
        Spawn(Kind.HOUSEKEEPER, 0, 1),
    ]
    assert node.sup.running()


def test_first_respawn_is_immediate() -> None:
    """A child that dies once is started again at once: no delay, not a crash loop."""
    node = Node({Kind.WEBSOCKET: 2})
    node.boot()
    node.ready(Kind.WEBSOCKET, 1, 1.0)
    exit_, actions = node.die(Kind.WEBSOCKET, 1, 50.0, code=-signal.SIGKILL)
    assert (exit_.expected, exit_.crash_loop, exit_.delay) == (False, False, 0.0)
    assert exit_.child.pid == node.pid(Kind.WEBSOCKET, 1)
    assert actions == [Spawn(Kind.WEBSOCKET, 1, 1)]


def test_crash_loop_backoff_grows_then_is_capped_with_jitter() -> None:
    """Each death in a row waits longer (doubling from backoff_base, capped at
    backoff_cap), between half and all of that ceiling; the respawn is due then, not before.
    """
    node = Node({Kind.HOUSEKEEPER: 1})
    node.boot()
    now = 0.0
    exit_, actions = node.die(Kind.HOUSEKEEPER, 0, now)
    assert exit_.delay == 0.0 and actions == [Spawn(Kind.HOUSEKEEPER, 0, 1)]
    node.spawn(spawns_of(actions), now)
    fractions = []
    for ceiling in CEILINGS:
        now += 0.1  # dies again before it could ever be called stable
        exit_, actions = node.die(Kind.HOUSEKEEPER, 0, now)
        assert exit_.crash_loop and not exit_.expected
        assert 0.5 * ceiling <= exit_.delay <= ceiling, (ceiling, exit_.delay)
        fractions.append(exit_.delay / ceiling)
        assert actions == []  # not yet: the delay has to pass first
        assert node.sup.tick(now + exit_.delay * 0.99) == []
        now += exit_.delay
        actions = node.sup.tick(now)
        assert actions == [Spawn(Kind.HOUSEKEEPER, 0, 1)]
        assert node.sup.tick(now) == []  # due once
        node.spawn(spawns_of(actions), now)
    assert len(set(fractions)) == len(fractions)  # jittered, not a fixed fraction


def test_backoff_jitter_spans_half_to_all_of_the_ceiling() -> None:
    """At the cap, many deaths draw delays over the whole of [cap / 2, cap]."""
    node = Node({Kind.HOUSEKEEPER: 1}, seed=1)
    node.boot()
    now, delays = 0.0, []
    for _ in range(200):
        exit_, now = node.crash(Kind.HOUSEKEEPER, 0, now + 0.1)
        delays.append(exit_.delay)
    capped = delays[4:]  # from the 5th death in a row, 0.5 * 2 ** 3 reaches the 4 s cap
    assert min(capped) >= 2.0 and max(capped) <= 4.0
    assert min(capped) < 2.2 and max(capped) > 3.8


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    """Two supervisors with the same seed draw the same delays (what makes these tests exact)."""

    def delays(seed: int) -> list[float]:
        node = Node({Kind.HOUSEKEEPER: 1}, seed=seed)
        node.boot()
        now, out = 0.0, []
        for _ in range(6):
            exit_, now = node.crash(Kind.HOUSEKEEPER, 0, now + 0.1)
            out.append(exit_.delay)
        return out

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_a_long_crash_loop_keeps_its_delay_at_the_cap() -> None:
    """A slot that crash-loops for hours (here 1100 deaths in a row, about nine hours at a
    30 s cap) still gets a delay at the cap: the exponent must not overflow in the master.
    """
    node = Node({Kind.HOUSEKEEPER: 1}, Policy(backoff_base=0.5, backoff_cap=30.0))
    node.boot()
    now = 0.0
    for _ in range(1100):
        exit_, now = node.crash(Kind.HOUSEKEEPER, 0, now + 0.1)
        assert exit_.delay <= 30.0
    assert exit_.delay >= 15.0


def test_a_stable_run_resets_the_failure_streak() -> None:
    """After a run of `stable_after` seconds past ready, the next death respawns at once;
    a shorter run keeps the crash loop's backoff.
    """
    node = Node({Kind.WEBSOCKET: 1})
    node.boot()
    now = 0.0
    for _ in range(2):  # a crash loop: the second death in a row already waits
        exit_, now = node.crash(Kind.WEBSOCKET, 0, now + 0.1)
    assert exit_.crash_loop

    node.ready(Kind.WEBSOCKET, 0, now)
    exit_, now = node.crash(Kind.WEBSOCKET, 0, now + POLICY.stable_after - 1)
    assert exit_.crash_loop and exit_.delay > 0  # too short a run to count as stable

    node.ready(Kind.WEBSOCKET, 0, now)
    exit_, actions = node.die(Kind.WEBSOCKET, 0, now + POLICY.stable_after + 1)
    assert not exit_.crash_loop and exit_.delay == 0.0
    assert actions == [Spawn(Kind.WEBSOCKET, 0, 1)]


def test_exit_boot_of_a_worker_fails_the_node() -> None:
    """A WebSocket worker exiting with EXIT_BOOT stops the node instead of respawning."""
    node = Node({Kind.WEBSOCKET: 2, Kind.HOUSEKEEPER: 1})
    node.boot()
    exit_, actions = node.die(Kind.WEBSOCKET, 1, 0.5, code=3)
    assert not exit_.expected
    assert actions == [Fail("worker 1 could not start (see its error above)")]
    assert node.sup.failure == "worker 1 could not start (see its error above)"
    assert node.sup.tick(1.0) == []  # no respawn comes due for it


def test_exit_boot_of_the_task_pool_fails_the_node() -> None:
    """A task pool whose task modules cannot be imported stops the node too; an ordinary
    death of the pool is respawned."""
    node = Node({Kind.WEBSOCKET: 1, Kind.HOUSEKEEPER: 1, Kind.TASKS: 1})
    node.boot()
    _, actions = node.die(Kind.TASKS, 0, 0.5, code=9)
    assert actions == [Spawn(Kind.TASKS, 0, 1)]
    node.spawn(spawns_of(actions), 0.5)
    _, actions = node.die(Kind.TASKS, 0, 1.0, code=3)
    assert actions == [Fail("task pool 0 could not start (see its error above)")]


def test_exit_boot_status_is_configurable_and_means_nothing_for_the_housekeeper() -> None:
    """The boot status is the one the supervisor is given; a housekeeper exiting with it
    is an ordinary death (the rule names WebSocket workers only)."""
    sup = Supervisor({Kind.WEBSOCKET: 1, Kind.HOUSEKEEPER: 1}, POLICY, boot_exit=42)
    spawns = spawns_of(sup.start(0.0))
    for pid, spawn in enumerate(spawns, start=1):
        sup.started(spawn, pid, 0.0)
    _, actions = sup.exited(1, 3, 1.0)  # 3 is not the boot status here
    assert actions == [Spawn(Kind.WEBSOCKET, 0, 1)]
    _, actions = sup.exited(2, 42, 1.0)
    assert actions == [Spawn(Kind.HOUSEKEEPER, 0, 1)] and sup.failure is None


def die_while_starting(node: Node, slot: int, now: float) -> tuple[list[Action], float]:
    """The worker in `slot` dies before ready; returns the actions and when it is back."""
    exit_, actions = node.die(Kind.WEBSOCKET, slot, now)
    if any(isinstance(a, Fail) for a in actions):
        return actions, now
    later = now + exit_.delay
    respawn = actions or node.sup.tick(later)
    node.spawn(spawns_of(respawn), later)
    return actions, later


def test_every_worker_slot_failing_to_start_fails_the_node() -> None:
    """When each worker slot has died `max_boot_failures` times in a row without ever
    being ready, the node stops: nothing serves and nothing will."""
    node = Node({Kind.WEBSOCKET: 2, Kind.HOUSEKEEPER: 1})
    node.boot()
    now = 0.0
    for _ in range(POLICY.max_boot_failures):
        actions, now = die_while_starting(node, 0, now + 0.1)
        assert not any(isinstance(a, Fail) for a in actions)
    for _ in range(POLICY.max_boot_failures - 1):
        actions, now = die_while_starting(node, 1, now + 0.1)
        assert not any(isinstance(a, Fail) for a in actions)  # slot 1 may still come up
    actions, now = die_while_starting(node, 1, now + 0.1)
    reason = f"every worker died while starting, {POLICY.max_boot_failures} times in a row"
    assert actions == [Fail(reason)]
    assert node.sup.failure == reason


def test_no_node_failure_while_one_worker_slot_was_ever_ready() -> None:
    """A slot that once served proves the node can serve: boot failures alone never fail it."""
    node = Node({Kind.WEBSOCKET: 2})
    node.boot()
    node.ready(Kind.WEBSOCKET, 0, 1.0)
    now = 2.0
    for _ in range(POLICY.max_boot_failures * 3):
        for slot in (0, 1):
            actions, now = die_while_starting(node, slot, now + 0.1)
            assert not any(isinstance(a, Fail) for a in actions)
    assert node.sup.failure is None


def test_stuck_child_gets_sigabrt_then_sigkill_once_each() -> None:
    """Silent past worker_timeout: SIGABRT (for its traceback); still there abort_grace
    later: SIGKILL. The embedded Redis has no heartbeat and is never aborted for silence."""
    node = Node({Kind.REDIS: 1, Kind.WEBSOCKET: 1, Kind.HOUSEKEEPER: 1})
    node.boot(0.0)
    worker, keeper, redis = (
        node.pid(Kind.WEBSOCKET),
        node.pid(Kind.HOUSEKEEPER),
        node.pid(Kind.REDIS),
    )
    node.ready(Kind.WEBSOCKET, 0, 1.0)
    node.sup.observe(keeper, ready=True, beat=20.0)  # the housekeeper beats later
    assert node.sup.tick(30.0) == []
    assert node.sup.tick(32.0) == [
        Signal(worker, signal.SIGABRT, "silent for 31 s (server.worker_timeout)")
    ]
    assert node.sup.tick(33.0) == []  # once only
    assert node.sup.tick(34.5) == []  # within abort_grace
    assert node.sup.tick(35.5) == [Signal(worker, signal.SIGKILL, "did not exit after SIGABRT")]
    assert node.sup.tick(51.0) == [
        Signal(keeper, signal.SIGABRT, "silent for 31 s (server.worker_timeout)")
    ]
    assert node.sup.tick(54.5) == [Signal(keeper, signal.SIGKILL, "did not exit after SIGABRT")]
    assert node.sup.tick(10_000.0) == []  # each killed once; Redis never signalled
    assert redis in node.sup.children


def test_a_beating_child_is_left_alone() -> None:
    """Heartbeats keep a child alive however long it runs; a stale beat does not undo a newer."""
    node = Node({Kind.WEBSOCKET: 1})
    node.boot(0.0)
    pid = node.pid(Kind.WEBSOCKET)
    for now in range(10, 1000, 10):
        node.sup.observe(pid, ready=True, beat=float(now))
        assert node.sup.tick(float(now) + 5) == []
    node.sup.observe(pid, ready=True, beat=1.0)  # an old reading arriving late
    assert node.sup.tick(1000.0) == []
    node.sup.observe(12345, ready=True, beat=1.0)  # not a child: ignored


def test_stop_terms_all_but_redis_and_redis_after_the_others() -> None:
    """Stop: SIGTERM to every child but Redis at once; Redis once the others have exited
    (they remove their state through it on the way out); no respawn meanwhile."""
    node = Node({Kind.REDIS: 1, Kind.WEBSOCKET: 2, Kind.HOUSEKEEPER: 1})
    node.boot(0.0)
    redis = node.pid(Kind.REDIS)
    others = [node.pid(Kind.WEBSOCKET, 0), node.pid(Kind.WEBSOCKET, 1), node.pid(Kind.HOUSEKEEPER)]
    actions = node.sup.stop(5.0, timeout=10.0)
    assert sorted(actions, key=lambda a: a.pid if isinstance(a, Signal) else 0) == [
        Signal(pid, signal.SIGTERM, "stopping") for pid in others
    ]
    for pid in others[:-1]:
        exit_, actions = node.sup.exited(pid, 0, 6.0)
        assert exit_ is not None and exit_.expected and actions == []
    assert node.sup.tick(7.0) == []  # no respawn, no signal before the deadline
    exit_, actions = node.sup.exited(others[-1], -signal.SIGTERM, 7.0)
    assert exit_ is not None and exit_.expected
    assert actions == [Signal(redis, signal.SIGTERM, "stopping")]
    assert node.sup.running()
    exit_, actions = node.sup.exited(redis, 0, 8.0)
    assert exit_ is not None and exit_.expected and actions == []
    assert not node.sup.running()


def test_stop_with_only_redis_left_terms_it_at_once() -> None:
    """When nothing else runs, Redis does not wait for anyone."""
    node = Node({Kind.REDIS: 1, Kind.WEBSOCKET: 1})
    node.boot(0.0)
    node.die(Kind.WEBSOCKET, 0, 1.0)  # its respawn is due, but not carried out yet
    assert node.sup.stop(1.0, timeout=10.0) == [
        Signal(node.pid(Kind.REDIS), signal.SIGTERM, "stopping")
    ]


def test_stop_deadline_kills_everything_left_once() -> None:
    """Past the stop deadline, every child still there, Redis included, gets SIGKILL once."""
    node = Node({Kind.REDIS: 1, Kind.WEBSOCKET: 2})
    node.boot(0.0)
    node.sup.stop(0.0, timeout=10.0)
    node.sup.exited(node.pid(Kind.WEBSOCKET, 0), 0, 1.0)
    assert node.sup.tick(9.0) == []
    why = "still running after server.shutdown_timeout"
    assert sorted(node.sup.tick(11.0), key=lambda a: a.pid if isinstance(a, Signal) else 0) == [
        Signal(node.pid(Kind.REDIS), signal.SIGKILL, why),
        Signal(node.pid(Kind.WEBSOCKET, 1), signal.SIGKILL, why),
    ]
    assert node.sup.tick(12.0) == []
    assert node.sup.running()


def test_stop_twice_kills_at_once() -> None:
    """A second stop (a second Ctrl-C) does not wait for the deadline: SIGKILL to all, once."""
    node = Node({Kind.REDIS: 1, Kind.WEBSOCKET: 1, Kind.HOUSEKEEPER: 1})
    node.boot(0.0)
    node.sup.stop(0.0, timeout=10.0)
    actions = node.sup.stop(1.0, timeout=10.0)
    assert sorted(actions, key=lambda a: a.pid if isinstance(a, Signal) else 0) == [
        Signal(pid, signal.SIGKILL, "stopped twice") for pid in sorted(node.pids.values())
    ]
    assert node.sup.tick(20.0) == []  # the deadline finds them killed already


@pytest.mark.parametrize("stopping", [False, True])
def test_unknown_pid_exiting_is_described_as_none(stopping: bool) -> None:
    """A pid that is no child (a stray grandchild reaped as PID 1) changes nothing."""
    node = Node({Kind.WEBSOCKET: 1})
    node.boot(0.0)
    if stopping:
        node.sup.stop(0.0, timeout=10.0)
    assert node.sup.exited(99_999, 0, 1.0) == (None, [])
    assert node.sup.children.keys() == {node.pid(Kind.WEBSOCKET)}


def test_running_until_stopped_and_every_child_gone() -> None:
    """running() is true while not stopping, even with no child, and false only after a
    stop once the last child exited."""
    sup = Supervisor({Kind.WEBSOCKET: 1}, POLICY, rng=random.Random(0))
    assert sup.running()  # nothing started yet, but not stopping either
    (spawn,) = spawns_of(sup.start(0.0))
    sup.started(spawn, 10, 0.0)
    sup.exited(10, 1, 1.0)
    assert sup.running()  # a respawn is due: still running
    sup.stop(2.0, timeout=5.0)
    assert not sup.running()  # stopping, and no child left


# Rollouts: replacement first, one slot at a time


def _ready_all(node: Node, now: float) -> None:
    for kind, slot in list(node.pids):
        node.ready(kind, slot, now)


def _rollout_step(node: Node, actions: list[Action], now: float) -> Spawn:
    """The one spawn a rollout step asks for, started at `now`."""
    (spawn,) = [a for a in actions if isinstance(a, Spawn)]
    assert spawn.replaces is not None
    node.spawn([spawn], now)
    return spawn


def test_reload_replaces_each_worker_after_its_replacement_is_ready() -> None:
    node = Node({Kind.WEBSOCKET: 2, Kind.HOUSEKEEPER: 1})
    node.boot(0.0)
    _ready_all(node, 0.5)
    old = [node.pid(Kind.WEBSOCKET, 0), node.pid(Kind.WEBSOCKET, 1)]
    first = _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET, Kind.TASKS)), 1.0)
    assert (first.slot, first.replaces, first.generation) == (0, old[0], 2)
    # Not ready yet: the old worker is left alone, and nothing else starts.
    assert node.sup.tick(2.0) == []
    node.ready(Kind.WEBSOCKET, 0, 2.5)
    actions = node.sup.tick(3.0)
    assert Retire(old[0], f"replaced by worker 0 (pid {node.pid(Kind.WEBSOCKET, 0)})") in actions
    second = _rollout_step(node, actions, 3.0)
    assert (second.slot, second.replaces) == (1, old[1])
    # The retired worker's exit is expected and starts nothing.
    exit_, after = node.sup.exited(old[0], 0, 3.5)
    assert exit_ is not None and exit_.expected and after == []
    node.ready(Kind.WEBSOCKET, 1, 4.0)
    actions = node.sup.tick(4.5)
    assert [type(a) for a in actions] == [Retire, Rolled]
    assert actions[-1] == Rolled(ok=True, seconds=3.5)
    # The housekeeper is not part of a reload.
    assert node.pid(Kind.HOUSEKEEPER) in node.sup.children


def test_replacement_dying_while_starting_aborts_the_reload() -> None:
    """uvicorn's rule: a reload that cannot start a healthy worker leaves the old ones."""
    node = Node({Kind.WEBSOCKET: 2})
    node.boot(0.0)
    _ready_all(node, 0.5)
    old = node.pid(Kind.WEBSOCKET, 0)
    _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET,)), 1.0)
    # Even the "cannot start" status (a broken application) only aborts the reload.
    exit_, actions = node.die(Kind.WEBSOCKET, 0, 2.0, code=3)
    assert exit_ is not None and not exit_.expected
    assert actions == [Rolled(ok=False, seconds=1.0, reason="worker 0 died while starting")]
    assert node.sup.failure is None
    assert old in node.sup.children and node.sup.tick(3.0) == []


def test_replacement_not_ready_in_time_is_killed_and_the_reload_aborted() -> None:
    node = Node({Kind.WEBSOCKET: 1}, Policy(ready_timeout=5.0))
    node.boot(0.0)
    _ready_all(node, 0.5)
    _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET,)), 1.0)
    new = node.pid(Kind.WEBSOCKET, 0)
    actions = node.sup.tick(7.0)
    assert Signal(new, signal.SIGKILL, "not ready in time") in actions
    assert actions[-1] == Rolled(
        ok=False, seconds=6.0, reason=f"worker 0 (pid {new}) was not ready within 5 s"
    )
    exit_, after = node.sup.exited(new, -9, 7.1)
    assert exit_ is not None and exit_.expected and after == []


def test_reload_asked_again_while_running_rolls_every_slot_once_more() -> None:
    node = Node({Kind.WEBSOCKET: 1})
    node.boot(0.0)
    _ready_all(node, 0.5)
    _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET,)), 1.0)
    assert node.sup.reload(1.5, (Kind.WEBSOCKET,)) == []
    node.ready(Kind.WEBSOCKET, 0, 2.0)
    actions = node.sup.tick(2.0)
    assert Rolled(ok=True, seconds=1.0) in actions
    again = _rollout_step(node, actions, 2.0)
    assert again.generation == 3


def test_recycle_replaces_one_worker_once() -> None:
    node = Node({Kind.WEBSOCKET: 2})
    node.boot(0.0)
    _ready_all(node, 0.5)
    pid = node.pid(Kind.WEBSOCKET, 1)
    spawn = _rollout_step(node, node.sup.recycle(pid, 1.0), 1.0)
    assert (spawn.slot, spawn.replaces) == (1, pid)
    assert node.sup.recycle(pid, 1.1) == []  # asked again every turn: once is enough
    node.ready(Kind.WEBSOCKET, 1, 1.5)
    assert node.sup.tick(2.0) == [
        Retire(pid, f"replaced by worker 1 (pid {node.pid(Kind.WEBSOCKET, 1)})", "max_request")
    ]


def test_a_worker_started_by_a_reload_can_be_recycled_later() -> None:
    node = Node({Kind.WEBSOCKET: 1})
    node.boot(0.0)
    _ready_all(node, 0.5)
    _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET,)), 1.0)
    node.ready(Kind.WEBSOCKET, 0, 1.5)
    node.sup.tick(2.0)
    reloaded = node.pid(Kind.WEBSOCKET, 0)
    spawn = _rollout_step(node, node.sup.recycle(reloaded, 3.0), 3.0)
    assert spawn.replaces == reloaded


def test_old_worker_dying_during_its_replacement_is_not_respawned() -> None:
    node = Node({Kind.WEBSOCKET: 1})
    node.boot(0.0)
    _ready_all(node, 0.5)
    old = node.pid(Kind.WEBSOCKET, 0)
    _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET,)), 1.0)
    exit_, actions = node.sup.exited(old, -9, 1.5)
    assert exit_ is not None and not exit_.expected and actions == []
    node.ready(Kind.WEBSOCKET, 0, 2.0)
    assert node.sup.tick(2.5) == [Rolled(ok=True, seconds=1.5)]


def test_retiring_worker_that_does_not_exit_is_killed() -> None:
    node = Node({Kind.WEBSOCKET: 1}, Policy(retire_timeout=4.0))
    node.boot(0.0)
    _ready_all(node, 0.5)
    old = node.pid(Kind.WEBSOCKET, 0)
    _rollout_step(node, node.sup.reload(1.0, (Kind.WEBSOCKET,)), 1.0)
    node.ready(Kind.WEBSOCKET, 0, 1.5)
    node.sup.tick(2.0)
    node.sup.observe(old, ready=True, beat=6.0)  # still beating: not stuck, just slow
    assert Signal(old, signal.SIGKILL, "still retiring after its time to finish") in node.sup.tick(
        6.5
    )


def test_scale_adds_the_next_slot_and_removes_the_highest() -> None:
    node = Node({Kind.WEBSOCKET: 2})
    node.boot(0.0)
    _ready_all(node, 0.5)
    assert node.sup.scale(1.0, 3) == [Spawn(Kind.WEBSOCKET, 2, 1)]
    node.spawn([Spawn(Kind.WEBSOCKET, 2, 1)], 1.0)
    highest = node.pid(Kind.WEBSOCKET, 2)
    actions = node.sup.scale(2.0, 2)
    assert actions == [Drop(2), Retire(highest, "its slot was removed", "scale", drain=True)]
    assert node.sup.worker_slots() == [0, 1]
    exit_, after = node.sup.exited(highest, 0, 2.5)
    assert exit_ is not None and exit_.expected and after == []


def test_sigquit_kills_every_child_at_once() -> None:
    node = Node({Kind.WEBSOCKET: 1, Kind.HOUSEKEEPER: 1, Kind.REDIS: 1})
    node.boot(0.0)
    kills = node.sup.kill(1.0)
    assert {a.pid for a in kills if isinstance(a, Signal) and a.signum == signal.SIGKILL} == set(
        node.pids.values()
    )
    assert node.sup.kill(1.5) == []  # already killed
