"""The master's status file: round trip, errors, staleness, and how `shoal status`
prints it."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest

from shoal.core.errors import StatusUnavailable
from shoal.server import control, status

T0 = 1_700_000_000.0


def snapshot(**changes: object) -> status.Snapshot:
    base = status.Snapshot(
        pid=4242,
        node="a1b2c3",
        started_at=T0,
        updated_at=T0 + 3725,
        state="reloading",
        listen="ws://127.0.0.1:9501/ws",
        workers=(
            status.Worker(
                slot=1,
                pid=4250,
                generation=1,
                started_at=T0 + 1,
                state="retiring",
                connections=1204,
                messages=1_234_567,
            ),
            status.Worker(
                slot=0,
                pid=4301,
                generation=2,
                started_at=T0 + 3700,
                state="serving",
                connections=0,
                messages=7,
            ),
        ),
        housekeeper=status.Housekeeper(pid=4245, started_at=T0 + 1),
        task_pool=status.TaskPool(pid=4246, started_at=T0 + 1, processes=2),
        redis=status.Redis(address="127.0.0.1:6379", embedded=False, up=True),
        reloads=3,
        last_reload=status.Reload(
            at=T0 + 3000, ok=False, seconds=12.5, reason="worker 0 never became ready"
        ),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "shoal-9501.status.json"
    written = snapshot()
    status.write(path, written)
    assert status.read(path) == written
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_the_file_is_the_documented_json(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    status.write(path, snapshot(housekeeper=None, task_pool=None, last_reload=None))
    data = json.loads(path.read_text())
    assert list(data) == [
        "version",
        "pid",
        "node",
        "started_at",
        "updated_at",
        "state",
        "listen",
        "workers",
        "housekeeper",
        "task_pool",
        "redis",
        "reloads",
        "last_reload",
    ]
    assert data["version"] == 1
    assert data["workers"][0] == {
        "slot": 1,
        "pid": 4250,
        "generation": 1,
        "started_at": T0 + 1,
        "state": "retiring",
        "connections": 1204,
        "messages": 1_234_567,
    }
    assert data["redis"] == {"address": "127.0.0.1:6379", "embedded": False, "up": True}
    assert data["housekeeper"] is data["task_pool"] is data["last_reload"] is None


@pytest.mark.parametrize(
    ("pid_file", "expected"),
    [
        ("/run/shoal-9501.pid", "/run/shoal-9501.status.json"),
        ("/run/shoal", "/run/shoal.status.json"),
        ("/run/x.pid.d/master.lock", "/run/x.pid.d/master.lock.status.json"),
    ],
)
def test_the_status_file_lies_beside_the_pid_file(pid_file: str, expected: str) -> None:
    assert status.path_for(Path(pid_file)) == Path(expected)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no status file at"),
        ("{", "is not JSON"),
        ('{"version": 2}', "is of version 2; this shoal reads version 1"),
        ("[1]", "is of version None"),
        ('{"version": 1, "pid": 1}', "is malformed: node: Field required"),
    ],
)
def test_unreadable_status_files_are_explained(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StatusUnavailable, match=message):
        status.read(path)


def test_a_status_older_than_five_seconds_is_stale() -> None:
    written = snapshot()
    assert not written.stale(written.updated_at + 5)
    assert written.stale(written.updated_at + 5.1)
    assert written.uptime(T0 + 90) == 90


def test_the_table() -> None:
    """Workers by slot, aligned columns (numbers to the right), then the other facts."""
    now = T0 + 3725
    assert control.render(snapshot(), now, pid=4242) == (
        "shoal node a1b2c3: reloading, master pid 4242, ws://127.0.0.1:9501/ws\n"
        "\n"
        "SLOT   PID  GENERATION  STATE       AGE  CONNECTIONS   MESSAGES\n"
        "   0  4301           2  serving     25s            0          7\n"
        "   1  4250           1  retiring  1h02m        1,204  1,234,567\n"
        "\n"
        "housekeeper  pid 4245, up 1h02m\n"
        "task pool    pid 4246, 2 processes, up 1h02m\n"
        "redis        127.0.0.1:6379: up\n"
        "uptime       1h02m\n"
        "reloads      3; the last 12m05s ago: aborted (worker 0 never became ready) in 12.5 s\n"
    )


def test_the_table_flags_a_stale_status_and_what_is_missing() -> None:
    written = snapshot(
        workers=(),
        housekeeper=None,
        task_pool=None,
        redis=status.Redis(address="embedded", embedded=True, up=None),
        last_reload=None,
        reloads=0,
    )
    text = control.render(written, written.updated_at + 12, pid=4242)
    assert "STALE: the master last wrote its status 12s ago: it may be stuck\n" in text
    assert "no workers\n" in text
    assert "housekeeper  none\n" in text and "task pool    none\n" in text
    assert "redis        embedded (embedded): unknown\n" in text
    assert "reloads      0\n" in text
    other = control.render(written, written.updated_at, pid=5000)
    assert "STALE: this status was written by pid 4242, not by the running master" in other
