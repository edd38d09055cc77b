"""The peer comparison shows, for each server and scenario, the median of its rounds."""

from __future__ import annotations

from typing import Any

from shoal.bench.peers.compare import median_run


def run(per_cpu_second: float, p99: float) -> dict[str, Any]:
    return {"server": {"received_per_cpu_second": per_cpu_second}, "p99": p99}


def test_the_median_round_is_one_real_run() -> None:
    rounds = [run(30.0, 1.0), None, run(10.0, 2.0), run(20.0, 3.0)]
    # A failed round (None) is left out; of three, the middle one, all its figures.
    assert median_run("echo", rounds) == run(20.0, 3.0)
    # Of two, the higher one; connect runs are judged by connections per CPU-second.
    connect = [
        {"server": {"connections_per_cpu_second": 5.0}},
        {"server": {"connections_per_cpu_second": 7.0}},
    ]
    assert median_run("connect", connect) == connect[1]
    assert median_run("echo", [None, None]) is None
