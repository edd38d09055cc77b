"""/metrics and the connection log, end to end: a real node of two workers, plain
`websockets` clients, and the page read back with prometheus-client's own parser."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from support import Samples, Shoal, client, clients_on_workers, join, scrape, wait_until

OPENED = ("shoal_connections_opened_total", "")
OPEN = ("shoal_connections", "")


def settle(node: Shoal, expected: Samples, *, timeout: float = 10) -> Samples:
    """Scrape until every sample in `expected` has its value (workers publish once a
    second); return the last scrape. On timeout, fail showing the values that differ."""
    last: Samples = {}

    def done() -> bool:
        nonlocal last
        last = scrape(node)
        # Every connection gets a welcome, spares included: the two agree once settled.
        welcomed = last["shoal_messages_out_total", "welcome"] == last[OPENED]
        return welcomed and all(last.get(key) == value for key, value in expected.items())

    try:
        wait_until(done, timeout, "the metrics to count the traffic", interval=0.2)
    except AssertionError:
        assert {key: last.get(key) for key in expected} == expected
        raise
    return last


def counter_samples(samples: Samples) -> Samples:
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith(("_total", "_count", "_sum", "_bucket"))
    }


async def test_the_counters_equal_the_traffic_sent_to_both_workers(shoal: Shoal) -> None:
    sent = 0
    async with clients_on_workers(shoal, ["ann", "bo", "cy", "di"]) as clients:
        ann, bo, cy, di = clients
        await join("lobby", *clients)  # 0 + 1 + 2 + 3 user_joined_room deliveries
        for n in range(3):
            message = {"type": "room_message", "room": "lobby", "message": f"hi {n}"}
            await ann.send(message)
            sent += len(json.dumps(message))
        for member in clients:  # 4 members x 3 messages, across both workers
            for _ in range(3):
                await member.expect("room_message")
        await bo.request({"type": "shout", "text": "echoed"}, "echo")
        await cy.ws.send("not json")
        await cy.expect("error")
        await di.request({"type": "leave_room", "room": "nowhere"}, "error")

        samples = settle(
            shoal,
            {
                ("shoal_messages_in_total", "join_room"): 4,
                ("shoal_messages_in_total", "room_message"): 3,
                ("shoal_messages_in_total", "leave_room"): 1,
                ("shoal_messages_in_total", "other"): 2,  # the shout and the invalid JSON
                ("shoal_messages_in_total", "broadcast"): 0,
                ("shoal_messages_out_total", "joined_room"): 4,
                ("shoal_messages_out_total", "echo"): 1,
                ("shoal_messages_out_total", "error"): 2,
                ("shoal_deliveries_total", ""): 6 + 12,
                ("shoal_protocol_errors_total", "message"): 2,
                ("shoal_protocol_errors_total", "frame"): 0,
                ("shoal_slow_consumers_total", ""): 0,
                OPEN: 4,
            },
        )
        assert samples["shoal_bytes_in_total", ""] > sent
        assert samples["shoal_bytes_out_total", ""] > 0

        await ann.ws.close(1000)
        await bo.ws.close(1001)
        await cy.ws.close(4100, "a code of the application's")
        await di.ws.close(3000)

    opened = samples[OPENED]  # spare connections of clients_on_workers too, closed with 1000
    samples = settle(
        shoal,
        {
            OPENED: opened,
            OPEN: 0,
            ("shoal_connections_closed_total", "1000"): opened - 3,
            ("shoal_connections_closed_total", "1001"): 1,
            ("shoal_connections_closed_total", "other"): 2,
        },
    )
    closed = sum(v for (name, _), v in samples.items() if name == "shoal_connections_closed_total")
    assert closed == opened


async def test_the_counters_do_not_go_back_when_a_worker_is_killed(shoal: Shoal) -> None:
    """The killed worker's last publication stays in the node's totals."""
    async with clients_on_workers(shoal, ["ann", "bo"]) as clients:
        for member in clients:
            for _ in range(5):
                await member.request({"type": "shout"}, "echo")
        before = settle(shoal, {("shoal_messages_in_total", "other"): 10})
        victim = int(clients[1].connection_id.split(".")[2])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in shoal.worker_pids(), 10, "the worker to die")
        wait_until(lambda: shoal.health(expect_ok=True), 15, "its replacement")

    after = scrape(shoal)
    assert after["shoal_messages_in_total", "other"] == 10
    assert after["shoal_messages_out_total", "echo"] == 10
    assert after["shoal_worker_restarts_total", "crashed"] == 1
    assert after["shoal_worker_restarts_total", "reload"] == 0
    went_back = {
        key: (value, after[key])
        for key, value in counter_samples(before).items()
        if after[key] < value
    }
    assert went_back == {}


def test_the_page_moves_with_metrics_path_and_null_turns_it_off(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    moved = Shoal(tmp_path / "a", {**settings, "server": {"metrics_path": "/stats"}}).start()
    off = Shoal(tmp_path / "b", {**settings, "server": {"metrics_path": None}}).start()
    try:
        assert OPENED in scrape(moved, "/stats")
        for node, path in ((moved, "/metrics"), (off, "/metrics")):
            with pytest.raises(urllib.error.HTTPError) as error:
                scrape(node, path)
            assert error.value.code == 404
    finally:
        moved.stop()
        off.stop()


async def test_connections_are_logged_with_their_close_and_never_a_token(shoal: Shoal) -> None:
    async with client(shoal.url("ann") + "&token=s3cr3t-t0ken") as ann:
        cid = ann.connection_id
        host, port = ann.ws.local_address[:2]
        await ann.ws.close(4100)

    log = wait_until(
        lambda: f"connection closed: id={cid} " in shoal.log() and shoal.log(), 10, "the close"
    )
    assert re.search(
        rf"INFO .* connection opened: id={re.escape(cid)} user=ann role=user "
        rf"address={host}:{port}\n",
        log,
    )
    assert re.search(
        rf"INFO .* connection closed: id={re.escape(cid)} user=ann address={host}:{port} "
        r"duration=\d+\.\d{3}s code=4100\n",
        log,
    )
    assert "s3cr3t" not in log
    assert "token" not in log


async def test_log_connections_false_turns_the_lines_off(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    node = Shoal(tmp_path, {**settings, "log": {"level": "info", "connections": False}}).start()
    try:
        async with client(node.url("ann")):
            pass
        # The page counts the close once it was handled, logged or not.
        wait_until(
            lambda: scrape(node)["shoal_connections_closed_total", "1000"] == 1, 10, "the close"
        )
        assert "connection opened" not in node.log()
        assert "connection closed" not in node.log()
    finally:
        node.stop()


async def test_tasks_are_counted_by_outcome_with_their_run_time_and_the_queue_depth(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    node = Shoal(
        tmp_path,
        {**settings, "tasks": {"task_worker_num": 1, "concurrency": 1, "retry_backoff": 0.05}},
    ).start()
    try:
        async with client(node.url("ann")) as ann:
            for data in ({"numbers": [1, 2]}, {"numbers": "nope"}, {"numbers": [3]}):
                await ann.request({"type": "task", "task": "process_data", "data": data},
                                  "task_dispatched")  # fmt: skip
                await ann.recv(timeout=20)  # its outcome
            # One at a time: the queue holds three jobs, then two, then one.
            for _ in range(3):
                slow = {"message": "late", "delay": 1.5}
                await ann.request({"type": "task", "task": "broadcast_delayed", "data": slow},
                                  "task_dispatched")  # fmt: skip
            wait_until(
                lambda: scrape(node)["shoal_task_queue_depth", ""] >= 2, 10, "a queue of jobs"
            )
            outcomes = [(await ann.recv(timeout=20))["type"] for _ in range(6)]
            assert sorted(outcomes) == ["broadcast"] * 3 + ["task_result"] * 3

        samples = settle(
            node,
            {
                ("shoal_tasks_total", "ok"): 5,
                ("shoal_tasks_total", "failed"): 1,
                ("shoal_tasks_total", "timeout"): 0,
                ("shoal_task_run_seconds_count", ""): 6,
                ("shoal_task_queue_depth", ""): 0,
                ("shoal_messages_in_total", "task"): 6,
                ("shoal_messages_out_total", "task_result"): 5,
                ("shoal_messages_out_total", "task_failed"): 1,
            },
            timeout=15,
        )
        assert samples["shoal_task_run_seconds_sum", ""] >= 3 * 1.5
        assert samples["shoal_task_run_seconds_bucket", "10.0"] == 6
    finally:
        node.stop()
