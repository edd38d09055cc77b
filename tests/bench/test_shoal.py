"""shoal-bench against a live shoal (two workers, real Redis): known counts, exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.bench.cli import main
from shoal.bench.summary import EXIT_OK

from support import SCALE, Shoal, wait_until


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    # The scenarios send faster than a chat client may (docs/bench.md#rate-limits).
    return {**settings, "limits": {"messages_per_second": None, "bytes_per_second": None}}


_SHORT = ["--duration", "1", "--warmup", "0.2", "--processes", "2", "--drain", str(5 * SCALE)]


def _run(tmp_path: Path, *argv: str) -> dict[str, object]:
    out = tmp_path / "result.json"
    code = main([*argv, *_SHORT, "--json", str(out)])
    run: dict[str, object] = json.loads(out.read_text())["runs"][0]
    assert code == EXIT_OK, run["problems"]
    return run


@pytest.mark.parametrize(
    ("scenario", "flags", "receivers_per_message"),
    [
        ("fanout", ["-c", "6", "--publishers", "2"], 6),
        ("broadcast", ["-c", "4", "--publishers", "2"], 3),
        ("private", ["-c", "4"], 1),
    ],
)
def test_streams_against_shoal_deliver_exactly(
    tmp_path: Path, shoal: Shoal, scenario: str, flags: list[str], receivers_per_message: int
) -> None:
    run = _run(tmp_path, scenario, "--url", shoal.url(), "--rate", "200", *flags)
    integrity = run["integrity"]
    assert isinstance(integrity, dict)
    assert integrity["expected"] == integrity["sent"] * receivers_per_message > 0
    assert integrity["received"] == integrity["expected"]
    for name in ("lost", "duplicates", "reorders", "gap_events", "unexpected", "mismatches"):
        assert integrity[name] == 0, name


def test_echo_and_connect_against_shoal(tmp_path: Path, shoal: Shoal) -> None:
    run = _run(tmp_path, "echo", "--url", shoal.url(), "-c", "4", "--pipeline", "2")
    assert run["integrity"]["mismatches"] == 0  # type: ignore[index]
    assert run["traffic"]["received"] > 0  # type: ignore[index]
    run = _run(
        tmp_path, "connect", "--url", shoal.url(), "-c", "40", "--server-pid", str(shoal.pid)
    )
    assert run["connections"]["connected"] == 40  # type: ignore[index]
    assert run["connections"]["failed"] == {}  # type: ignore[index]
    assert run["server"]["memory_per_connection_kib"]["rss"] is not None  # type: ignore[index]
    # They were all closed again, and shoal forgot them.
    wait_until(lambda: shoal.health()["connections"] == 0, 5, "connections to close")  # type: ignore[index]


@pytest.mark.parametrize("task", ["noop", "process_data"])
def test_tasks_against_shoal_come_back_each_once_and_right(
    tmp_path: Path, settings: dict[str, Any], task: str
) -> None:
    """A node with a task pool runs the jobs; each result matches its job."""
    node = Shoal(tmp_path, {**settings, "tasks": {"task_worker_num": 2}}).start()
    try:
        run = _run(tmp_path, "task", "--url", node.url(), "-c", "4", "--pipeline", "2",
                   "--task", task)  # fmt: skip
    finally:
        node.stop()
    assert run["integrity"]["mismatches"] == 0  # type: ignore[index]
    assert run["integrity"]["unanswered"] == 0  # type: ignore[index]
    assert run["traffic"]["received"] > 0  # type: ignore[index]
