"""`shoal reload`, `stop` and `status` in a subprocess, against a stand-in master
(`fake_master.py`) that writes its pid and status files as the master does."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from shoal.server import status

from support import SCALE, SHOAL, FakeMaster

Start = Callable[..., FakeMaster]


def shoal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, *args], capture_output=True, text=True, env=env, timeout=30 * SCALE
    )


def test_reload_waits_for_the_reload_and_reports_it(fake_master: Start) -> None:
    master = fake_master("--reload", "ok")
    out = shoal("reload", "--pid-file", str(master.pid_file), "--timeout", str(10 * SCALE))
    assert out.returncode == 0, out.stderr
    # The stand-in's second generation of workers has pids 20000 and 20001.
    assert out.stdout.startswith("reloaded in 0.")
    assert "2 workers serving (pids 20000, 20001)" in out.stdout
    assert status.read(status.path_for(master.pid_file)).reloads == 1


def test_an_aborted_reload_exits_1_with_its_reason(fake_master: Start) -> None:
    master = fake_master("--reload", "abort")
    out = shoal("reload", "--pid-file", str(master.pid_file), "--timeout", str(10 * SCALE))
    assert out.returncode == 1
    assert "reload aborted after 0.3 s: worker 0 never became ready" in out.stderr
    assert "the previous workers still serve" in out.stderr


def test_a_reload_that_does_not_finish_times_out(fake_master: Start) -> None:
    master = fake_master("--reload", "hang")
    out = shoal("reload", "--pid-file", str(master.pid_file), "--timeout", "1")
    assert out.returncode == 1
    assert "timed out after 1 s waiting for the reload" in out.stderr
    assert "its state: reloading" in out.stderr


def test_stop_waits_until_the_master_is_gone(fake_master: Start) -> None:
    master = fake_master()
    out = shoal("stop", "--pid-file", str(master.pid_file))
    assert out.returncode == 0, out.stderr
    assert f"stopped the master (pid {master.pid})" in out.stdout
    assert master.finish() == (0, ["SIGTERM"])
    assert not master.pid_file.exists()


def test_stop_now_sends_sigquit(fake_master: Start) -> None:
    master = fake_master()
    out = shoal("stop", "--now", "--pid-file", str(master.pid_file))
    assert out.returncode == 0, out.stderr
    assert master.finish() == (0, ["SIGQUIT"])


def test_status_prints_a_table(fake_master: Start) -> None:
    master = fake_master()
    out = shoal("status", "--pid-file", str(master.pid_file))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert (
        lines[0] == f"shoal node fake01: running, master pid {master.pid}, ws://127.0.0.1:9501/ws"
    )
    assert lines[2].split() == [
        "SLOT",
        "PID",
        "GENERATION",
        "STATE",
        "AGE",
        "CONNECTIONS",
        "MESSAGES",
    ]
    assert lines[3].split()[:4] == ["0", "10000", "1", "serving"]
    assert lines[4].split()[-2:] == ["1,201", "54,321"]
    assert "housekeeper  pid 9001" in out.stdout
    assert "redis        127.0.0.1:6379: up" in out.stdout
    assert "STALE" not in out.stdout


def test_status_json(fake_master: Start) -> None:
    master = fake_master()
    out = shoal("status", "--json", "--pid-file", str(master.pid_file))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["version"] == 1 and data["pid"] == master.pid and data["state"] == "running"
    assert [w["pid"] for w in data["workers"]] == [10000, 10001]
    assert data["stale"] is False
    assert 0 <= data["uptime"] < 30 * SCALE


def test_a_stale_status_exits_3(fake_master: Start) -> None:
    master = fake_master("--stale")
    table = shoal("status", "--pid-file", str(master.pid_file))
    assert table.returncode == 3
    # Written 60 s before the fake master started; read a moment later.
    assert re.search(
        r"STALE: the master last wrote its status 1m0\ds ago: it may be stuck", table.stdout
    )
    assert "is stale" in table.stderr
    as_json = shoal("status", "--json", "--pid-file", str(master.pid_file))
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["stale"] is True


@pytest.mark.parametrize("command", [["reload"], ["stop"], ["status"], ["status", "--json"]])
def test_not_running(command: list[str], tmp_path: Path) -> None:
    path = tmp_path / "shoal.pid"
    missing = shoal(*command, "--pid-file", str(path))
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr == f"shoal: no pid file at {path}: is shoal running? (server.pid_file)\n"
    path.write_text(f"{os.getpid()}\n")  # pytest: not a shoal master
    stale = shoal(*command, "--pid-file", str(path))
    assert stale.returncode == 1
    assert stale.stderr.startswith(f"shoal: stale pid file {path}: process {os.getpid()} is not")


def test_the_config_file_names_the_pid_file(fake_master: Start, tmp_path: Path) -> None:
    master = fake_master(pid_file=tmp_path / "run" / "master.pid")
    config = tmp_path / "shoal.yaml"
    config.write_text(yaml.safe_dump({"server": {"pid_file": str(master.pid_file)}}))
    out = shoal("status", "--config", str(config))
    assert out.returncode == 0, out.stderr


def test_the_default_pid_file_goes_by_port(fake_master: Start, tmp_path: Path) -> None:
    """Without a pid_file, master and commands agree on `shoal-<port>.pid` in
    $XDG_RUNTIME_DIR: the default port without --config, the file's port with it."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    fake_master(pid_file=tmp_path / "shoal-9501.pid")
    assert shoal("status", env=env).returncode == 0
    config = tmp_path / "shoal.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": 9600}}))
    out = shoal("status", "--config", str(config), env=env)
    assert out.returncode == 1
    assert f"no pid file at {tmp_path / 'shoal-9600.pid'}" in out.stderr


def test_an_invalid_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": "x"}}))
    out = shoal("status", "--config", str(config))
    assert out.returncode == 2
    assert "server.port" in out.stderr
