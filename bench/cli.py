"""``shoal-bench`` command line: parse options, run (and compare), write results."""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from shoal.bench.display import Progress, print_results
from shoal.bench.htmlreport import render_report
from shoal.bench.limits import FD_OVERHEAD, FdLimitError, ensure_fd_limit
from shoal.bench.nullserver import start_null_server
from shoal.bench.orchestrator import RunError, run_plan
from shoal.bench.plan import PROTOCOLS, PUSHER_SCENARIOS, SCENARIOS, TASKS, RunPlan
from shoal.bench.probe import ServerProbe
from shoal.bench.summary import EXIT_ERROR, EXIT_OK, summarize

logger = logging.getLogger(__name__)

SCHEMA = "shoal-bench/1"
# Connections are bounded so a typo cannot exhaust the machine.
MAX_CONNECTIONS = 200_000
# Overall time limit on top of warmup + duration + drain, for connecting and startup.
_TIMEOUT_SLACK_S = 60.0
# Where --pusher-secret is read from when not given: a command line is visible to others.
PUSHER_SECRET_ENV = "SHOAL_BENCH_PUSHER_SECRET"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document every option)."""
    p = argparse.ArgumentParser(
        prog="shoal-bench",
        description="WebSocket load generator for shoal and protocol-compatible servers.",
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument(
        "--url", help="server URL, e.g. ws://127.0.0.1:9000/ws (required unless --self-test)"
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="shoal",
        help="shoal: shoal's own JSON protocol; pusher: Pusher's protocol 7, --url "
        f"ws://HOST:PORT/app/KEY ({', '.join(PUSHER_SCENARIOS)} only; default shoal)",
    )
    p.add_argument(
        "--pusher-secret",
        default=os.environ.get(PUSHER_SECRET_ENV),
        help="the Pusher app's secret, which signs the fanout's private-channel "
        f"subscriptions (default: ${PUSHER_SECRET_ENV})",
    )
    p.add_argument(
        "-c",
        "--connections",
        type=int,
        help="connections (connect: to open; echo/broadcast/private: in use; "
        "fanout: subscribers). Defaults: connect 1000, echo 50, fanout 100, "
        "broadcast 20, private 100",
    )
    p.add_argument(
        "--publishers",
        type=int,
        default=1,
        help="fanout publishers / broadcast senders (default 1)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="load processes (default: CPUs minus one, at least 1)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p.add_argument(
        "--drain",
        type=float,
        default=5.0,
        help="max seconds to wait for outstanding messages after sending (default 5)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="connect: connections/s; fanout/broadcast/private: total messages/s; "
        "0 = as fast as possible (default 0)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="echo, task: messages (tasks) in flight per connection (default 1)",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=32,
        help="unacknowledged messages per sender (default 32)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="payload padding bytes; task process_data: numbers per job (default 64)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default="noop",
        help="task: the built-in task each job runs (default noop)",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="echo: the server echoes frames verbatim (no welcome, no JSON envelope)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="fanout: a connection closed or dropped by the server reconnects and rejoins "
        "the room from the last offset it saw (the room needs a history: app.history)",
    )
    p.add_argument(
        "--no-welcome",
        action="store_true",
        help="count a connection once the handshake completes (server sends none)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds per connection attempt incl. welcome (default 10)",
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=256,
        help="handshakes in progress per load process (default 256)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="hard limit on one run in seconds (default: warmup + duration + drain + 60)",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="server process to sample (children included); repeatable",
    )
    p.add_argument("--compare", metavar="URL2", help="also run against this server and compare")
    p.add_argument(
        "--compare-protocol",
        choices=PROTOCOLS,
        help="the protocol spoken to the --compare server (default: --protocol)",
    )
    p.add_argument(
        "--compare-pid",
        type=int,
        action="append",
        default=[],
        help="process of the --compare server to sample; repeatable",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --compare: alternate A, B this many times each (default 1)",
    )
    p.add_argument(
        "--self-test",
        action="store_true",
        help="run against a built-in null server to measure this tool's ceiling",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write all results as JSON")
    p.add_argument("--report", type=Path, metavar="FILE.html", help="write an HTML report")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


_DEFAULT_CONNECTIONS = {
    "connect": 1000,
    "echo": 50,
    "fanout": 100,
    "broadcast": 20,
    "private": 100,
    "task": 20,
}


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.url and not args.self_test:
        parser.error("--url is required (or use --self-test)")
    if args.self_test and args.compare:
        parser.error("--self-test cannot be combined with --compare")
    if args.connections is None:
        args.connections = _DEFAULT_CONNECTIONS[args.scenario]
    positive = (
        "connections",
        "processes",
        "pipeline",
        "max_inflight",
        "rounds",
        "connect_concurrency",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.drain < 0 or args.rate < 0:
        parser.error("--duration must be > 0; --warmup, --drain, --rate must be >= 0")
    if args.scenario in ("fanout", "broadcast") and args.publishers < 1:
        parser.error("--publishers must be at least 1")
    if args.scenario == "broadcast" and args.publishers > args.connections:
        parser.error("--publishers cannot exceed --connections for broadcast")
    if args.scenario == "private" and args.connections % 2:
        parser.error("private needs an even --connections (pairs of users)")
    if args.raw and args.scenario != "echo":
        parser.error("--raw only applies to the echo scenario")
    if args.protocol == "pusher" and args.self_test:
        parser.error("--self-test speaks shoal's protocol: it cannot run --protocol pusher")
    total = args.connections + (args.publishers if args.scenario == "fanout" else 0)
    if total > MAX_CONNECTIONS:
        parser.error(f"at most {MAX_CONNECTIONS} connections per run")
    if args.compare_protocol is None:
        args.compare_protocol = args.protocol
    elif not args.compare:
        parser.error("--compare-protocol needs --compare")
    targets = [(args.url, args.protocol), (args.compare, args.compare_protocol)]
    for url, protocol in targets:
        echoless = args.scenario == "broadcast" or (
            args.scenario == "fanout" and protocol == "pusher"
        )
        if echoless and args.rate == 0 and total // min(args.processes, total) < 2:
            parser.error(
                f"{args.scenario} with --rate 0 needs at least 2 connections per load process "
                "(one observes delivery to pace the sender); set --rate or fewer --processes"
            )
        if url:
            try:
                _plan(args, url, protocol)
            except ValueError as exc:
                parser.error(str(exc))


def _plan(args: argparse.Namespace, url: str, protocol: str) -> RunPlan:
    total = args.connections
    if args.scenario == "fanout":
        total += args.publishers
    return RunPlan(
        scenario=args.scenario,
        url=url,
        connections=total,
        processes=min(args.processes, total),
        duration=args.duration,
        warmup=args.warmup,
        drain=args.drain,
        rate=args.rate,
        pipeline=args.pipeline,
        publishers=args.publishers,
        max_inflight=args.max_inflight,
        size=args.size,
        task=args.task,
        raw=args.raw,
        welcome=not args.no_welcome,
        connect_timeout=args.connect_timeout,
        connect_concurrency=args.connect_concurrency,
        protocol=protocol,
        pusher_secret=args.pusher_secret if protocol == "pusher" else None,
        resume=args.resume,
    )


def _one_run(
    args: argparse.Namespace, url: str, protocol: str, pids: list[int], label: str
) -> dict[str, Any]:
    plan = _plan(args, url, protocol)
    probe = ServerProbe(pids) if pids else None
    limit = args.timeout or (args.warmup + args.duration + args.drain + _TIMEOUT_SLACK_S)
    progress = Progress(f"{label} {plan.scenario}")
    try:
        outcome = run_plan(plan, probe, progress, limit)
    finally:
        progress.close()
    return summarize(outcome, label)


def _host() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def _comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(label: str, path: tuple[str, ...]) -> float | None:
        values: list[float] = []
        for run in runs:
            if run["label"] != label:
                continue
            node: Any = run
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, int | float):
                values.append(float(node))
        return sum(values) / len(values) if values else None

    metrics = {
        "received_per_s": ("traffic", "received_per_s"),
        "latency_p50_ms": ("traffic", "latency_ms", "p50"),
        "latency_p99_ms": ("traffic", "latency_ms", "p99"),
        "connections_per_s": ("connections", "per_second"),
        "received_per_cpu_second": ("server", "received_per_cpu_second"),
    }
    out: dict[str, Any] = {"ratio": "B/A", "metrics": {}}
    for name, path in metrics.items():
        a, b = mean("A", path), mean("B", path)
        ratio = b / a if a and b is not None else None
        out["metrics"][name] = {"A": a, "B": b, "B/A": ratio}
    return out


def _redacted(argv: list[str], secret: str | None) -> list[str]:
    """``argv`` with the Pusher secret masked wherever it appears, for the results."""
    if not secret:
        return argv
    return [arg.replace(secret, "***") for arg in argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (see docs/bench.md)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    per_process = math.ceil(
        (args.connections + args.publishers) / max(1, min(args.processes, args.connections))
    )
    try:
        ensure_fd_limit(per_process + FD_OVERHEAD)
    except FdLimitError as exc:
        print(f"shoal-bench: {exc}", file=sys.stderr)
        return EXIT_ERROR

    null_server = None
    url = args.url
    if args.self_test:
        url, null_server = start_null_server(raw=args.raw)
    runs: list[dict[str, Any]] = []
    try:
        if args.compare:
            for _ in range(args.rounds):
                runs.append(_one_run(args, url, args.protocol, args.server_pid, "A"))
                runs.append(
                    _one_run(args, args.compare, args.compare_protocol, args.compare_pid, "B")
                )
        else:
            pids = list(args.server_pid)
            if null_server is not None and null_server.pid is not None:
                pids.append(null_server.pid)
            label = "self-test" if args.self_test else "A"
            runs.append(_one_run(args, url, args.protocol, pids, label))
    except (RunError, ValueError) as exc:
        print(f"shoal-bench: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("shoal-bench: interrupted", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if null_server is not None:
            null_server.terminate()
            null_server.join(timeout=5)

    comparison = _comparison(runs) if args.compare else None
    shown = [runs[-2], runs[-1]] if args.compare else runs
    print_results(shown, "B/A" if args.compare else None)
    if comparison is not None and args.rounds > 1:
        for name, row in comparison["metrics"].items():
            print(
                f"mean over {args.rounds} rounds {name}: A={row['A']} B={row['B']} B/A={row['B/A']}"
            )
    for run in runs:
        for problem in run["problems"]:
            print(f"shoal-bench: {run['label']}: {problem}", file=sys.stderr)

    document = {
        "schema": SCHEMA,
        "argv": _redacted(list(argv) if argv is not None else sys.argv[1:], args.pusher_secret),
        "host": _host(),
        "runs": runs,
        "comparison": comparison,
    }
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    if args.report is not None:
        args.report.write_text(render_report(document), encoding="utf-8")
    codes = [run["exit_code"] for run in runs if run["exit_code"] != EXIT_OK]
    return min(codes) if codes else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
