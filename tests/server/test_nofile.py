"""The open-files limit the master raises before it forks (`shoal.server.limits`).

`raise_nofile` changes the limits of the process that calls it, so it runs in a child
started with the limits each test sets.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from shoal.server import limits

INFINITY = resource.RLIM_INFINITY
_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_in_child(
    soft: int, hard: int, max_connection: int, worker_num: int
) -> tuple[int, int, str | None]:
    """Run `raise_nofile` in a child whose limits start at (`soft`, `hard`); returns its
    limits afterwards and the warning."""
    code = (
        "import json, resource\n"
        "from shoal.server.limits import raise_nofile\n"
        f"warning = raise_nofile({max_connection}, {worker_num})\n"
        "print(json.dumps([*resource.getrlimit(resource.RLIMIT_NOFILE), warning]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        capture_output=True,
        text=True,
        check=True,
    )
    new_soft, new_hard, warning = json.loads(out.stdout)
    return new_soft, new_hard, warning


def test_one_worker_needs_its_share_of_clients_plus_headroom() -> None:
    assert limits.needed(100_000, 2) == 50_000 + limits.HEADROOM
    assert limits.needed(5, 2) == 3 + limits.HEADROOM


@pytest.mark.skipif(HARD != INFINITY and HARD < 2048, reason="the hard limit here is below 2048")
def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    assert raise_in_child(256, HARD, 1000, 2) == (HARD, HARD, None)


@pytest.mark.skipif(HARD != INFINITY and HARD < 2048, reason="the hard limit here is below 2048")
def test_a_hard_limit_too_low_for_the_config_is_reported_with_the_fix() -> None:
    soft, hard, warning = raise_in_child(512, 2048, 100_000, 2)
    assert (soft, hard) == (2048, 2048)
    assert warning is not None
    need = 50_000 + limits.HEADROOM
    for fix in (f"LimitNOFILE={need}", f"minfds={need}", f"ulimit -n {need}"):
        assert fix in warning
    assert "the limit is 2048, below the 51024 each worker needs" in warning


@pytest.mark.parametrize(
    ("soft", "hard", "need", "nr_open", "expected"),
    [
        (1024, 4096, 100, 1_048_576, 4096),  # up to the hard limit, even past the need
        (4096, 4096, 100_000, 1_048_576, 4096),  # already there
        (1024, INFINITY, 5000, 1_048_576, 5000),  # unlimited: what is needed
        (1024, INFINITY, 5000, 4096, 4096),  # ... capped by the kernel's nr_open
        (1024, INFINITY, 5000, None, 5000),  # ... where nr_open is unknown
        (8000, INFINITY, 5000, 1_048_576, 8000),  # never lowered
        (INFINITY, INFINITY, 5000, 1_048_576, INFINITY),
    ],
)
def test_target(soft: int, hard: int, need: int, nr_open: int | None, expected: int) -> None:
    assert limits.target(soft, hard, need, nr_open) == expected
