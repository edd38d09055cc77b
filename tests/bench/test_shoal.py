"""shoal-bench against a live shoal (two workers, real Redis): known counts, exactly, in
shoal's own protocol and in Pusher's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.bench.cli import PUSHER_SECRET_ENV, main
from shoal.bench.summary import EXIT_INVALID, EXIT_OK

from support import SCALE, Shoal, wait_until

KEY, SECRET = "bench-key", "bench-secret-0123456789"


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    # The scenarios send faster than a chat client may, and Pusher's publishers more
    # client events than an app allows by default (docs/bench.md#rate-limits).
    app = {"id": "1", "key": KEY, "secret": SECRET, "client_events_per_second": 1_000_000}
    return {
        **settings,
        "limits": {"messages_per_second": None, "bytes_per_second": None},
        "pusher": {"apps": [app]},
    }


_SHORT = ["--duration", "1", "--warmup", "0.2", "--processes", "2", "--drain", str(5 * SCALE)]


def _run(tmp_path: Path, *argv: str, expect: int = EXIT_OK) -> dict[str, Any]:
    out = tmp_path / "result.json"
    code = main([*argv, *_SHORT, "--json", str(out)])
    document: dict[str, Any] = json.loads(out.read_text())
    run: dict[str, Any] = document["runs"][0]
    assert code == expect, run["problems"]
    assert SECRET not in out.read_text()  # results get shared: the secret stays out
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
    assert integrity["expected"] == integrity["sent"] * receivers_per_message > 0
    assert integrity["received"] == integrity["expected"]
    for name in ("lost", "duplicates", "reorders", "gap_events", "unexpected", "mismatches"):
        assert integrity[name] == 0, name


def test_echo_and_connect_against_shoal(tmp_path: Path, shoal: Shoal) -> None:
    run = _run(tmp_path, "echo", "--url", shoal.url(), "-c", "4", "--pipeline", "2")
    assert run["integrity"]["mismatches"] == 0
    assert run["traffic"]["received"] > 0
    run = _run(
        tmp_path, "connect", "--url", shoal.url(), "-c", "40", "--server-pid", str(shoal.pid)
    )
    assert run["connections"]["connected"] == 40
    assert run["connections"]["failed"] == {}
    assert run["server"]["memory_per_connection_kib"]["rss"] is not None
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
    assert run["integrity"]["mismatches"] == 0
    assert run["integrity"]["unanswered"] == 0
    assert run["traffic"]["received"] > 0


def _pusher(shoal: Shoal, *argv: str) -> list[str]:
    return ["--protocol", "pusher", "--url", shoal.url(path=f"/app/{KEY}"), *argv]


@pytest.mark.parametrize(("rate", "secret_from"), [("200", "flag"), ("0", "environment")])
def test_pusher_fanout_against_shoal_delivers_exactly(
    tmp_path: Path, shoal: Shoal, monkeypatch: pytest.MonkeyPatch, rate: str, secret_from: str
) -> None:
    """Client events on a private channel reach every subscriber once, in order; the
    publishers get none of their own back (Pusher never echoes to the sender), and at
    --rate 0 their arrival at another connection paces them."""
    secret = ["--pusher-secret", SECRET]
    if secret_from == "environment":
        monkeypatch.setenv(PUSHER_SECRET_ENV, SECRET)
        secret = []
    run = _run(tmp_path, "fanout", *_pusher(shoal, *secret), "-c", "6", "--publishers", "2",
               "--rate", rate, "--server-pid", str(shoal.pid))  # fmt: skip
    integrity = run["integrity"]
    assert run["plan"]["protocol"] == "pusher"
    assert integrity["expected"] == integrity["sent"] * 6 > 0
    assert integrity["received"] == integrity["expected"]
    for name in ("lost", "duplicates", "reorders", "gap_events", "unexpected", "mismatches"):
        assert integrity[name] == 0, name
    assert integrity["server_errors"] == {}
    assert run["traffic"]["received"] > 0
    assert run["server"]["received_per_cpu_second"] > 0


def test_pusher_connect_and_refusals_against_shoal(tmp_path: Path, shoal: Shoal) -> None:
    run = _run(tmp_path, "connect", *_pusher(shoal), "-c", "20", "--server-pid", str(shoal.pid))
    assert run["connections"]["connected"] == 20
    assert run["connections"]["handshake_ms"]["count"] == 20
    # The secret is not the app's: every subscription is refused, and said so.
    run = _run(tmp_path, "fanout", *_pusher(shoal, "--pusher-secret", "not-the-secret"),
               "-c", "2", "--rate", "50", expect=EXIT_INVALID)  # fmt: skip
    assert run["connections"]["failed"] == {"subscription_error": 3}
    # An unknown key: the server's pusher:error names its code.
    url = shoal.url(path="/app/no-such-key")
    run = _run(tmp_path, "connect", "--protocol", "pusher", "--url", url, "-c", "2",
               expect=EXIT_INVALID)  # fmt: skip
    assert run["connections"]["failed"] == {"pusher_4001": 2}
    wait_until(lambda: shoal.health()["connections"] == 0, 5, "connections to close")  # type: ignore[index]
