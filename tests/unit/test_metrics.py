"""The node's counters in shared memory: publication, the fold of a released seat, labels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.core import metrics
from shoal.core.metrics import Counters
from shoal.core.scoreboard import Scoreboard


def totals(board: Scoreboard) -> dict[str, dict[str, float]]:
    """The node's totals by family, then label value ("" for a family without labels)."""
    return {
        family.name: dict(zip(family.values or ("",), values, strict=True))
        for family, values in metrics.split(board.metrics.totals())
    }


def counted(opened: int, echoes: int) -> Counters:
    counts = Counters()
    counts.connections_opened = opened
    counts.messages_in["join_room"] = echoes
    counts.bytes_out = 100 * echoes
    counts.closed(1000)
    counts.task_queue_depth = 7
    return counts


def test_a_released_seat_keeps_its_counts_in_the_node_totals() -> None:
    """Counters never go backwards when a child goes: its row is folded into the retired
    row, and the next child of the seat counts from zero on top of it."""
    board = Scoreboard(3)
    board.claim(0, 1001, 0.0, serving=True)
    board.claim(1, 1002, 0.0, serving=True)
    board.metrics.publish(0, counted(opened=2, echoes=5))
    board.metrics.publish(1, counted(opened=3, echoes=1))
    before = totals(board)
    assert before["connections_opened"][""] == 5
    assert before["messages_in"]["join_room"] == 6
    assert before["connections_closed"]["1000"] == 2

    board.release(0)
    assert totals(board) == {**before, "task_queue_depth": {"": 7}}

    board.claim(0, 1003, 1.0, serving=True)
    board.metrics.publish(0, counted(opened=1, echoes=0))
    after = totals(board)
    assert after["connections_opened"][""] == 6
    assert after["messages_in"]["join_room"] == 6
    assert after["bytes_out"][""] == 600
    assert after["connections_closed"]["1000"] == 3


def test_gauges_are_the_largest_of_the_live_seats_and_go_with_their_seat() -> None:
    board = Scoreboard(2)
    first, second = Counters(), Counters()
    first.task_queue_depth, second.task_queue_depth = 4, 9
    board.metrics.publish(0, first)
    board.metrics.publish(1, second)
    assert totals(board)["task_queue_depth"][""] == 9
    board.release(1)
    assert totals(board)["task_queue_depth"][""] == 4
    board.release(0)
    assert totals(board)["task_queue_depth"][""] == 0


def test_counts_a_forked_child_published_survive_its_exit() -> None:
    """The memory is shared with children forked after it was made, as the master's is."""
    board = Scoreboard(2)
    pid = os.fork()
    if pid == 0:  # the child: publish, and leave without running any cleanup
        board.metrics.publish(1, counted(opened=4, echoes=2))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert totals(board)["connections_opened"][""] == 4
    board.release(1)
    assert totals(board)["connections_opened"][""] == 4
    assert totals(board)["messages_in"]["join_room"] == 2


def test_the_master_counts_restarts_and_reloads_into_the_retired_row() -> None:
    board = Scoreboard(1)
    board.metrics.count_restart("crashed")
    board.metrics.count_restart("crashed")
    board.metrics.count_restart("stuck")
    board.metrics.count_reload(1.5, True)
    board.metrics.count_reload(0.25, ok=False)
    board.release(0)  # a seat's fold leaves them alone
    counts = totals(board)
    assert counts["worker_restarts"] == {
        "crashed": 2, "stuck": 1, "reload": 0, "max_request": 0, "scale": 0
    }  # fmt: skip
    assert counts["reloads"] == {"ok": 1, "failed": 1}
    assert counts["reload_duration_seconds"] == {"count": 2, "sum": 1.75}
    with pytest.raises(ValueError, match="nap"):
        board.metrics.count_restart("nap")


def test_label_values_outside_the_known_ones_count_as_other() -> None:
    """No client or application can add a series: unknown codes and types are "other"."""
    counts = Counters()
    counts.closed(4999)
    counts.closed(1006)
    counts.sent("nope")
    counts.sent(["unhashable"])
    counts.sent("welcome")
    assert counts.connections_closed["other"] == 1
    assert counts.connections_closed["1006"] == 1
    assert counts.messages_out["other"] == 2
    assert counts.messages_out["welcome"] == 1
    assert set(counts.connections_closed) == set(metrics.CLOSE_CODES)
    assert set(counts.messages_out) == set(metrics.TYPES_OUT)


def test_task_runs_fill_cumulative_buckets() -> None:
    counts = Counters()
    counts.ran(0.05)
    counts.ran(2.0)
    counts.ran(120.0)
    board = Scoreboard(1)
    board.metrics.publish(0, counts)
    assert totals(board)["task_run_seconds"] == {
        "0.01": 0, "0.1": 1, "1.0": 1, "10.0": 2, "60.0": 2, "+Inf": 3, "sum": 122.05
    }  # fmt: skip


def test_every_family_has_a_row_column_and_help() -> None:
    assert len(Counters().row()) == metrics.PROCESS_COLUMNS
    assert sum(family.width for family in metrics.FAMILIES) == metrics.COLUMNS
    names = [family.name for family in metrics.FAMILIES]
    assert len(set(names)) == len(names)
    assert all(family.help.endswith(".") for family in metrics.FAMILIES)


def test_docs_operations_lists_every_metric() -> None:
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    for family in metrics.FAMILIES:
        suffix = "_total" if family.kind == "counter" else ""
        assert f"| `shoal_{family.name}{suffix}` |" in text, family.name
