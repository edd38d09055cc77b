"""Run every scenario against each server and write docs/performance.md.

Servers: the plain-websockets peer, the Node ``ws`` peer, Django Channels with
channels_redis (one uvicorn worker and its own Redis), and shoal itself
(``shoal serve``) with one worker and with one worker per CPU. Each server is
pinned to CPU 0 and the load to CPU 1 with ``taskset`` (a 2-core machine),
except shoal with a worker per CPU, which runs on every CPU, the load's
included. Every server and scenario runs ``--rounds`` times, round after round, and
the run with the median figure is shown; every run samples the server with
``--server-pid``, so figures per server CPU-second stay comparable. shoal's part is
skipped with a message when ``shoal serve`` is unavailable. Run from the repository
root: ``python -m shoal.bench.peers.compare``. A section headed ``## Optimization log``
in the existing output file is kept, after the generated part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).resolve().parent / "node"
LOG_HEADING = "## Optimization log"
_READY_TIMEOUT_S = 30.0

# (name, shoal-bench arguments, server runs in raw echo mode)
SCENARIOS: list[tuple[str, list[str], bool]] = [
    ("connect", ["connect", "-c", "3000"], False),
    ("echo", ["echo", "-c", "50", "--pipeline", "4"], False),
    ("echo-raw", ["echo", "--raw", "-c", "50", "--pipeline", "4"], True),
    ("fanout", ["fanout", "-c", "100", "--publishers", "2"], False),
    ("broadcast", ["broadcast", "-c", "20", "--publishers", "2"], False),
    ("private", ["private", "-c", "100"], False),
]


@dataclass
class ServerSpec:
    """How to start one server: a command for protocol mode and one for raw echo."""

    name: str
    command: list[str]
    echo_command: list[str]
    path: str = "/ws"
    pinned: bool = True


def _printable(command: list[str]) -> str:
    """Shell form of ``command`` without this machine's absolute paths."""
    shown = []
    for arg in command:
        if arg == sys.executable:
            shown.append("python")
        elif Path(arg).parent == Path(sys.executable).parent:
            shown.append(Path(arg).name)
        elif os.path.isabs(arg) and Path(arg).exists():
            shown.append(os.path.relpath(arg))
        else:
            shown.append(arg)
    return shlex.join(shown)


def _tool(name: str) -> str | None:
    """A console script of this installation: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pin(cpu: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") else command


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on port {port}")


def _shoal_available() -> str | None:
    """None when ``shoal serve`` works, else the reason it is skipped."""
    shoal = _tool("shoal")
    if shoal is None:
        return "the `shoal` command is not installed"
    probe = subprocess.run([shoal, "serve", "--help"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "`shoal serve` is not available yet in this checkout"
    return None


_UNLIMITED = ("MESSAGES_PER_SECOND", "BYTES_PER_SECOND")


def _shoal_spec(name: str, workers: int, port: int) -> ServerSpec:
    def command(echo: bool) -> list[str]:
        shoal = _tool("shoal") or "shoal"
        flags = ["--host", "127.0.0.1", "--port", str(port), "--worker-num", str(workers)]
        # The scenarios send faster than a chat client may (docs/bench.md#rate-limits);
        # `env` execs shoal, so the sampled pid stays the server's.
        unlimited = ["env", *(f"SHOAL_LIMITS__{key}=null" for key in _UNLIMITED)]
        serve = [shoal, "serve", *flags, "--log-level", "warning"]
        return [*unlimited, *serve, *(["--app", "echo"] * echo)]

    return ServerSpec(name, command(False), command(True), pinned=workers == 1)


def _specs(port: int) -> tuple[list[ServerSpec], list[str]]:
    py = [sys.executable, "-m", "shoal.bench.peers.websockets_peer", "--port", str(port)]
    node = ["node", str(NODE_DIR / "server.js"), "--port", str(port)]
    specs = [ServerSpec("websockets", py, [*py, "--echo"])]
    notes: list[str] = []
    if shutil.which("node") and (NODE_DIR / "node_modules" / "ws").is_dir():
        specs.append(ServerSpec("node-ws", node, [*node, "--echo"]))
    else:
        notes.append(f"node-ws skipped: run `npm install` in {NODE_DIR.name}/ first")
    channels = [sys.executable, "-m", "shoal.bench.peers.channels_peer", "--port", str(port)]
    if importlib.util.find_spec("channels") and importlib.util.find_spec("uvicorn"):
        specs.append(ServerSpec("channels", channels, [*channels, "--echo"]))
    else:
        notes.append("channels skipped: install the peers extra (pip install 'shoal[peers]')")
    reason = _shoal_available()
    if reason is None:
        specs.append(_shoal_spec("shoal-1w", 1, port))
        specs.append(_shoal_spec(f"shoal-{os.cpu_count()}w", os.cpu_count() or 1, port))
    else:
        notes.append(f"shoal skipped: {reason}")
    return specs, notes


def _run_one(
    spec: ServerSpec, args: list[str], echo: bool, port: int, common: list[str], *, out: Path
) -> tuple[dict[str, Any] | None, str]:
    command = spec.echo_command if echo else spec.command
    server = subprocess.Popen(_pin("0", command) if spec.pinned else command)
    try:
        _wait_listening(port, server)
        url = f"ws://127.0.0.1:{port}{spec.path}"
        bench = _pin(
            "1",
            [
                _tool("shoal-bench") or "shoal-bench",
                *args,
                "--url",
                url,
                "--server-pid",
                str(server.pid),
                "--processes",
                "1",
                *common,
                "--json",
                str(out),
            ],
        )
        printable = _printable(bench).replace(
            f"--server-pid {server.pid}", "--server-pid $SERVER_PID"
        )
        print(f"$ {printable}", flush=True)
        subprocess.run(bench, check=False)
        if not out.exists():
            return None, printable
        document: dict[str, Any] = json.loads(out.read_text())
        return document["runs"][0], printable
    finally:
        server.terminate()
        server.wait(timeout=10)


def _key(scenario: str) -> tuple[str, str]:
    """The figure a scenario is judged by, which picks its median run."""
    if scenario == "connect":
        return ("server", "connections_per_cpu_second")
    return ("server", "received_per_cpu_second")


def median_run(scenario: str, runs: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The run whose key figure is the median of the rounds (the higher one of the two
    middle runs for an even count), so every figure shown comes from one real run."""
    measured = [r for r in runs if _metric(r, *_key(scenario)) is not None]
    if not measured:
        return None
    measured.sort(key=lambda r: _metric(r, *_key(scenario)) or 0.0)
    return measured[len(measured) // 2]


def _metric(run: dict[str, Any] | None, *path: str) -> float | None:
    node: Any = run
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return float(node) if isinstance(node, int | float) else None


_COLUMNS = [
    ("connect conn/CPU-s", "connect", ("server", "connections_per_cpu_second")),
    ("echo msg/s", "echo", ("traffic", "received_per_s")),
    ("echo msg/CPU-s", "echo", ("server", "received_per_cpu_second")),
    ("raw echo msg/CPU-s", "echo-raw", ("server", "received_per_cpu_second")),
    ("fan-out deliveries/s", "fanout", ("traffic", "received_per_s")),
    ("fan-out deliveries/CPU-s", "fanout", ("server", "received_per_cpu_second")),
    ("broadcast deliveries/CPU-s", "broadcast", ("server", "received_per_cpu_second")),
    ("private msg/CPU-s", "private", ("server", "received_per_cpu_second")),
    ("echo p99 ms", "echo", ("traffic", "latency_ms", "p99")),
    ("idle KiB/conn (RSS)", "connect", ("server", "memory_per_connection_kib", "rss")),
    ("idle KiB/conn (PSS)", "connect", ("server", "memory_per_connection_kib", "pss")),
]


# (what, scenario, metric, shoal's server, peer or None, lowest ratio or highest value)
_TARGETS = [
    ("chat echo per server CPU-second, shoal / Node ws", "echo",
     ("server", "received_per_cpu_second"), "node-ws", 1.0),
    ("connect per server CPU-second, shoal / Node ws", "connect",
     ("server", "connections_per_cpu_second"), "node-ws", 1.0),
    ("fan-out deliveries per server CPU-second, shoal / Node ws", "fanout",
     ("server", "received_per_cpu_second"), "node-ws", 1.0),
]  # fmt: skip


def _targets(results: dict[str, dict[str, dict[str, Any] | None]]) -> list[str]:
    """The issue's targets for shoal with one worker, met or missed, in this run."""
    shoal = results.get("shoal-1w")
    if shoal is None:
        return []
    lines = ["## Against the targets (shoal with one worker)", ""]
    for title, scenario, metric, peer, lowest in _TARGETS:
        mine = _metric(shoal.get(scenario), *metric)
        theirs = _metric(results.get(peer, {}).get(scenario), *metric)
        if mine is None or not theirs:
            lines.append(f"- {title}: not measured")
            continue
        ratio = mine / theirs
        verdict = "met" if ratio >= lowest else "missed"
        lines.append(f"- {title}: {ratio:.2f} (target at least {lowest:g}): {verdict}")
    rss = _metric(shoal.get("connect"), "server", "memory_per_connection_kib", "rss")
    node = _metric(
        results.get("node-ws", {}).get("connect"), "server", "memory_per_connection_kib", "rss"
    )
    if rss is not None and node:
        verdict = "met" if rss <= node else "missed"
        lines.append(
            f"- idle memory per connection: {rss:.1f} KiB RSS, Node ws {node:.1f} "
            f"(target at most Node ws): {verdict}"
        )
    return [*lines, ""]


def _machine() -> list[str]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores",
        f"- Kernel: {platform.release()}",
        f"- Python: {platform.python_version()}",
        f"- Node: {node.stdout.strip() or 'not installed'}",
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def write_markdown(
    path: Path,
    results: dict[str, dict[str, dict[str, Any] | None]],
    commands: list[str],
    notes: list[str],
) -> None:
    """Write the performance page from ``results[server][scenario]``."""
    names = list(results)
    lines = [
        "# shoal performance",
        "",
        "Generated by `python -m shoal.bench.peers.compare`. Each server is pinned to CPU 0",
        "and the load (one `shoal-bench` process) to CPU 1, except shoal with one worker per",
        "CPU, which runs on every CPU. shoal uses its embedded Redis, whose CPU and memory",
        "count as the server's. Figures per server CPU-second compare servers that use",
        "different amounts of CPU; deliveries per second show what the one load process",
        "could take in.",
        "",
        *_targets(results),
        "## Machine",
        "",
        *_machine(),
        "",
    ]
    lines += [
        "## Results",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for title, scenario, metric in _COLUMNS:
        cells = [_fmt(_metric(results[n].get(scenario), *metric)) for n in names]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ratios (per server CPU-second, higher is better; memory: lower is better)",
        "",
    ]
    shoal = [n for n in names if n.startswith("shoal")]
    peers = [n for n in names if not n.startswith("shoal")]
    if not shoal:
        lines.append("shoal was not measured; no ratios.")
    for s in shoal:
        for p in peers:
            for title, scenario, metric in _COLUMNS:
                if "CPU-s" not in title and "KiB" not in title:
                    continue
                a = _metric(results[p].get(scenario), *metric)
                b = _metric(results[s].get(scenario), *metric)
                if a and b is not None:
                    lines.append(f"- {title}: {s} / {p} = {b / a:.2f}")
    problems = [
        f"- {n} {sc}: {'; '.join(r['problems'])}"
        for n, runs in results.items()
        for sc, r in runs.items()
        if r and r["problems"]
    ]
    if problems or notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes], *problems]
    lines += ["", "## Commands", "", "```", *commands, "```", ""]
    log = _kept_log(path)
    path.write_text("\n".join(lines) + (f"\n{log}" if log else ""))


def _kept_log(path: Path) -> str:
    """The hand-written ``## Optimization log`` section of an earlier page, if any."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find(LOG_HEADING)
    return text[start:] if start >= 0 else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=Path("docs/performance.md"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of every server and scenario, interleaved; the median run is shown",
    )
    args = parser.parse_args(argv)
    common = ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    port = _free_port()
    runs: dict[str, dict[str, list[dict[str, Any] | None]]] = {}
    commands: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        specs, notes = _specs(port)
        for note in notes:
            print(note, file=sys.stderr)
        # Round after round rather than server after server: a shared machine's speed
        # drifts, and every server then sees the same drift.
        for round_ in range(args.rounds):
            for spec in specs:
                if round_ == 0:
                    shown = _pin("0", spec.command) if spec.pinned else spec.command
                    commands.append(f"# server {spec.name}: {_printable(shown)}")
                for name, bench_args, echo in SCENARIOS:
                    out = Path(tmp) / f"{spec.name}-{name}-{round_}.json"
                    run, command = _run_one(spec, bench_args, echo, port, common, out=out)
                    runs.setdefault(spec.name, {}).setdefault(name, []).append(run)
                    if round_ == 0:
                        commands.append(command.replace(str(out), f"{spec.name}-{name}.json"))
    results = {
        server: {name: median_run(name, rounds) for name, rounds in by_scenario.items()}
        for server, by_scenario in runs.items()
    }
    notes.append(f"each figure is from the median run of {args.rounds} interleaved rounds")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.output, results, commands, notes)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
