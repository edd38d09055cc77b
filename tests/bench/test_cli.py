"""End-to-end runs of shoal-bench against the websockets peer and the null server.

Counts are small and known, so results are asserted exactly; speed is never checked.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.bench.cli import main
from shoal.bench.summary import EXIT_INTEGRITY, EXIT_INVALID, EXIT_OK

TIMEOUT_SCALE = float(os.environ.get("SHOALTEST_TIMEOUT_SCALE", "1"))
Peer = Any  # conftest.Peer: has .url and .pid

pytestmark = pytest.mark.timeout(60 * TIMEOUT_SCALE)

_SHORT = [
    "--duration",
    "1",
    "--warmup",
    "0.2",
    "--processes",
    "2",
    "--drain",
    str(5 * TIMEOUT_SCALE),
    "--connect-timeout",
    str(5 * TIMEOUT_SCALE),
]


def _run(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "result.json"
    code = main([*argv, *_SHORT, "--json", str(out)])
    return code, json.loads(out.read_text())


def test_echo_counts_and_schema(tmp_path: Path, start_peer: Callable[..., Peer]) -> None:
    peer = start_peer()
    code, doc = _run(
        tmp_path,
        "echo",
        "--url",
        peer.url,
        "-c",
        "3",
        "--pipeline",
        "2",
        "--server-pid",
        str(peer.pid),
    )
    assert code == EXIT_OK
    assert doc["schema"] == "shoal-bench/1"
    run = doc["runs"][0]
    assert set(run) >= {
        "label",
        "scenario",
        "url",
        "plan",
        "connections",
        "traffic",
        "integrity",
        "server",
        "problems",
        "exit_code",
        "valid",
    }
    assert run["connections"]["connected"] == 3
    assert run["connections"]["failed"] == {}
    assert run["traffic"]["received"] > 0
    assert run["traffic"]["latency_ms"]["count"] == run["traffic"]["received"]
    assert run["integrity"]["mismatches"] == 0
    assert run["integrity"]["unanswered"] == 0
    assert run["server"]["cpu_seconds"] >= 0
    assert run["valid"] is True


def test_raw_echo(tmp_path: Path, start_peer: Callable[..., Peer]) -> None:
    peer = start_peer("--echo")
    code, doc = _run(tmp_path, "echo", "--raw", "--url", peer.url, "-c", "2")
    run = doc["runs"][0]
    assert code == EXIT_OK
    assert run["traffic"]["received"] > 0
    assert run["integrity"]["mismatches"] == 0


_STREAMS = pytest.mark.parametrize(
    ("scenario", "flags", "receivers_per_message"),
    [
        ("fanout", ["-c", "3", "--publishers", "2"], 3),
        ("broadcast", ["-c", "4", "--publishers", "2"], 3),
        ("private", ["-c", "4"], 1),
    ],
)


def _assert_exact(code: int, doc: dict[str, Any], receivers_per_message: int) -> None:
    integrity = doc["runs"][0]["integrity"]
    assert code == EXIT_OK, doc["runs"][0]["problems"]
    assert integrity["expected"] > 0
    assert integrity["received"] == integrity["expected"]
    for name in ("lost", "duplicates", "reorders", "gap_events", "unexpected", "mismatches"):
        assert integrity[name] == 0, name
    # Every message sent is owed to a known number of receivers.
    assert integrity["expected"] == integrity["sent"] * receivers_per_message


@_STREAMS
def test_streams_deliver_exactly(
    tmp_path: Path,
    start_peer: Callable[..., Peer],
    scenario: str,
    flags: list[str],
    receivers_per_message: int,
) -> None:
    peer = start_peer()
    code, doc = _run(tmp_path, scenario, "--url", peer.url, "--rate", "200", *flags)
    _assert_exact(code, doc, receivers_per_message)


@_STREAMS
def test_self_test_streams_deliver_exactly(
    tmp_path: Path, scenario: str, flags: list[str], receivers_per_message: int
) -> None:
    # The null server speaks the stream scenarios too, independently of the peer.
    code, doc = _run(tmp_path, scenario, "--self-test", "--rate", "200", *flags)
    _assert_exact(code, doc, receivers_per_message)


def test_injected_loss_is_detected(tmp_path: Path, start_peer: Callable[..., Peer]) -> None:
    peer = start_peer("--drop-every", "7")
    code, doc = _run(tmp_path, "fanout", "--url", peer.url, "-c", "3", "--rate", "300")
    integrity = doc["runs"][0]["integrity"]
    assert code == EXIT_INTEGRITY
    assert doc["runs"][0]["valid"] is False
    assert integrity["lost"] == integrity["expected"] - integrity["received"] > 0
    assert integrity["gap_events"] > 0
    assert integrity["examples"]["gaps"]
    assert integrity["examples"]["lost"]
    assert integrity["by_receiver"]


def test_connect_reports_memory(tmp_path: Path, start_peer: Callable[..., Peer]) -> None:
    peer = start_peer()
    code, doc = _run(
        tmp_path, "connect", "--url", peer.url, "-c", "20", "--server-pid", str(peer.pid)
    )
    run = doc["runs"][0]
    assert code == EXIT_OK
    assert run["connections"]["connected"] == 20
    assert run["connections"]["handshake_ms"]["count"] == 20
    assert run["traffic"] is None
    assert set(run["server"]["memory_per_connection_kib"]) == {"rss", "pss"}


def test_refused_connections_invalidate_the_run(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, doc = _run(tmp_path, "echo", "--url", f"ws://127.0.0.1:{port}/ws", "-c", "3")
    run = doc["runs"][0]
    assert code == EXIT_INVALID
    assert run["connections"]["failed"] == {"refused": 3}
    assert "no connection succeeded" in run["problems"]


def test_self_test_and_html_report(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    code, doc = _run(tmp_path, "echo", "--self-test", "-c", "2", "--report", str(report))
    assert code == EXIT_OK
    assert doc["runs"][0]["label"] == "self-test"
    page = report.read_text()
    assert page.count("<svg") == 2
    assert "src=" not in page
    assert "href=" not in page


def test_compare_runs_both(tmp_path: Path, start_peer: Callable[..., Peer]) -> None:
    a, b = start_peer(), start_peer()
    code, doc = _run(tmp_path, "echo", "--url", a.url, "--compare", b.url, "-c", "2")
    assert code == EXIT_OK
    assert [run["label"] for run in doc["runs"]] == ["A", "B"]
    assert doc["comparison"]["ratio"] == "B/A"
    assert doc["comparison"]["metrics"]["received_per_s"]["B/A"] > 0


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["private", "--url", "ws://127.0.0.1:1/ws", "-c", "3"])
    assert exc.value.code == 2


_APP = "ws://127.0.0.1:1/app/k"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["echo", "--protocol", "pusher", "--url", _APP], "not echo"),
        (["fanout", "--protocol", "pusher", "--url", _APP], "needs the app's secret"),
        (["fanout", "--protocol", "pusher", "--url", "ws://127.0.0.1:1/ws", "--pusher-secret",
          "s"], "path is /app/{key}, not '/ws'"),
        (["fanout", "--protocol", "pusher", "--self-test"], "cannot run --protocol pusher"),
        (["fanout", "--url", "ws://127.0.0.1:1/ws", "--compare-protocol", "pusher"],
         "--compare-protocol needs --compare"),
        (["fanout", "--url", "ws://127.0.0.1:1/ws", "--compare", "ws://127.0.0.1:1/ws",
          "--compare-protocol", "pusher", "--pusher-secret", "s"], "path is /app/{key}"),
        (["fanout", "--protocol", "pusher", "--url", _APP, "--pusher-secret", "s", "-c", "1",
          "--processes", "2", "--rate", "0"], "needs at least 2 connections per load process"),
        (["fanout", "--protocol", "pusher", "--url", _APP, "--pusher-secret", "s",
          "--no-welcome"], "--no-welcome does not apply"),
    ],
)  # fmt: skip
def test_pusher_usage_errors_exit_2(
    argv: list[str],
    error: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("SHOAL_BENCH_PUSHER_SECRET", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert error in capsys.readouterr().err
