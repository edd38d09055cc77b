"""shoal-bench --resume across a rolling reload: the fan-out's accounting holds when every
connection is closed with 1012 mid-run, reconnects and rejoins its room from its offset."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.bench.cli import main
from shoal.bench.summary import EXIT_OK, EXIT_USAGE

from support import SCALE, RedisServer, Shoal, wait_until

# Enough messages in the room's history that the reload falls inside the measured window.
_SAID_BEFORE_RELOAD = 100


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        **settings,
        "limits": {"messages_per_second": None, "bytes_per_second": None},
        "app": {"history": [{"rooms": "bench-*", "size": 100_000, "ttl": 300}]},
    }


def _said(redis_server: RedisServer, prefix: str) -> int:
    """Messages kept by the history of the bench's room (0 before its first)."""
    client = redis_server.client()
    return sum(int(client.xlen(key)) for key in client.scan_iter(match=f"{prefix}:hist:*"))


def _reload_midway(shoal: Shoal, redis_server: RedisServer, prefix: str) -> set[int]:
    """Once the run's room said enough, SIGHUP the master; the workers it replaced."""
    wait_until(lambda: _said(redis_server, prefix) >= _SAID_BEFORE_RELOAD, 10, "messages")
    old = set(shoal.worker_pids())
    shoal.signal(signal.SIGHUP)
    wait_until(lambda: not old & set(shoal.worker_pids()), 20, "workers to be replaced")
    return old


def test_resume_keeps_fanout_exact_across_a_rolling_reload(
    tmp_path: Path,
    shoal: Shoal,
    redis_server: RedisServer,
    prefix: str,
    record_property: Callable[[str, object], None],
) -> None:
    replaced: list[set[int]] = []
    reload = threading.Thread(
        target=lambda: replaced.append(_reload_midway(shoal, redis_server, prefix)), daemon=True
    )
    reload.start()
    out = tmp_path / "result.json"
    code = main(["fanout", "--url", shoal.url(), "--resume", "-c", "6", "--publishers", "2",
                 "--rate", "200", "--duration", str(4 * SCALE), "--warmup", "0.2",
                 "--processes", "2", "--drain", str(10 * SCALE), "--json", str(out)])  # fmt: skip
    reload.join(timeout=30 * SCALE)
    run: dict[str, Any] = json.loads(out.read_text())["runs"][0]
    assert replaced, "the reload did not happen during the run"
    assert code == EXIT_OK, run["problems"]
    resumed = run["connections"]["resumed"]
    record_property("resumed", resumed)  # the figures docs/delivery.md quotes
    record_property("integrity", {k: run["integrity"][k] for k in ("sent", "received", "lost")})
    # Connections were closed by their reloading worker, and each came back, caught up.
    assert set(resumed["broken"]) == {"close_1012"}
    assert resumed["reconnects"] == resumed["recovered"] == resumed["broken"]["close_1012"] > 0
    assert resumed["all_recovered"] is True
    assert resumed["not_recovered"] == {} and resumed["failed"] == {}
    assert run["connections"]["dropped"] == {}
    integrity = run["integrity"]
    assert integrity["expected"] == integrity["sent"] * 6 > 0
    assert integrity["received"] == integrity["expected"]
    for name in ("lost", "duplicates", "reorders", "gap_events", "unexpected", "mismatches"):
        assert integrity[name] == 0, name


def test_resume_without_history_fails_each_join_clearly(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """A room outside app.history has no offsets to resume from: its joins count as failed."""
    node = Shoal(tmp_path, {name: v for name, v in settings.items() if name != "app"}).start()
    out = tmp_path / "result.json"
    try:
        code = main(["fanout", "--url", node.url(), "--resume", "-c", "2", "--rate", "50",
                     "--duration", "0.5", "--warmup", "0", "--processes", "1",
                     "--json", str(out)])  # fmt: skip
    finally:
        node.stop()
    run: dict[str, Any] = json.loads(out.read_text())["runs"][0]
    assert code != EXIT_OK
    assert run["connections"]["failed"] == {"room_without_history": 3}


@pytest.mark.parametrize("argv", [["echo"], ["fanout", "--protocol", "pusher"]])
def test_resume_outside_the_shoal_fanout_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--url", "ws://127.0.0.1:1/app/k", "--pusher-secret", "s", "--resume"])
    assert exited.value.code == EXIT_USAGE
    assert "--resume applies to fanout in the shoal protocol only" in capsys.readouterr().err
