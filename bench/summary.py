"""Turns a merged :class:`RunOutcome` into the JSON-ready result of one run,
judges its validity, and maps problems to exit codes (see docs/bench.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shoal.bench.histogram import LatencyHistogram
from shoal.bench.ledger import EXAMPLE_LIMIT, LedgerReport
from shoal.bench.orchestrator import RunOutcome
from shoal.bench.plan import RunPlan
from shoal.bench.probe import ProbeSample
from shoal.bench.worker import ResumeReport

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_INTEGRITY = 4
EXIT_CONNECTIONS = 5

# Receivers listed individually in "integrity.by_receiver" (only those with problems).
_RECEIVER_LIMIT = 20


def latency_summary(histogram: LatencyHistogram) -> dict[str, float | int]:
    """Percentiles in milliseconds of a nanosecond histogram."""
    return {
        "count": histogram.count,
        "mean": histogram.mean() / 1e6,
        "p50": histogram.percentile(50) / 1e6,
        "p90": histogram.percentile(90) / 1e6,
        "p99": histogram.percentile(99) / 1e6,
        "p999": histogram.percentile(99.9) / 1e6,
        "max": histogram.maximum / 1e6,
    }


def summarize(outcome: RunOutcome, label: str) -> dict[str, Any]:
    """The ``runs[]`` entry of the JSON document for one run."""
    plan = outcome.plan
    connect = outcome.connect
    elapsed_s = max(1e-9, (connect.last_done_ns - connect.first_start_ns) / 1e9)
    result: dict[str, Any] = {
        "label": label,
        "scenario": plan.scenario,
        "url": plan.url,
        "plan": _plan(plan),
        "connections": {
            "requested": plan.connections,
            "connected": connect.connected,
            "failed": dict(connect.failures),
            "dropped": dict(outcome.drops),
            "elapsed_s": elapsed_s,
            "per_second": connect.connected / elapsed_s,
            "handshake_ms": latency_summary(connect.handshake),
            "resumed": _resumed(outcome),
        },
        "traffic": None,
        "integrity": None,
        "server": _server(outcome),
    }
    traffic = outcome.traffic
    if traffic is not None:
        meter = traffic.meter
        result["traffic"] = {
            "duration_s": plan.duration,
            "sent": meter.sent,
            "received": meter.received,
            "sent_per_s": meter.sent / plan.duration,
            "received_per_s": meter.received / plan.duration,
            "latency_ms": latency_summary(meter.latency),
            "latency_distribution": [
                [value / 1e6, pct] for value, pct in meter.latency.distribution()
            ],
            "timeline": {"step_s": outcome.timeline_step_s, "counts": meter.timeline},
        }
        result["integrity"] = _integrity(outcome)
        server = result["server"]
        if server is not None and server["cpu_seconds"]:
            server["received_per_cpu_second"] = meter.received / server["cpu_seconds"]
    problems, code = _judge(result)
    result["problems"] = problems
    result["exit_code"] = code
    result["valid"] = code in (EXIT_OK, EXIT_CONNECTIONS)
    return result


def _plan(plan: RunPlan) -> dict[str, Any]:
    """Every option of ``plan``, the Pusher secret left out: results get shared."""
    options = dataclasses.asdict(plan)
    del options["pusher_secret"]
    return options


def _integrity(outcome: RunOutcome) -> dict[str, Any]:
    plan = outcome.plan
    traffic = outcome.traffic
    assert traffic is not None
    out: dict[str, Any] = {
        "sent": sum(outcome.sent_by_source.values()),
        "expected": 0,
        "received": 0,
        "lost": 0,
        "duplicates": 0,
        "reorders": 0,
        "gap_events": 0,
        "unexpected": 0,
        "mismatches": traffic.mismatches,
        "unanswered": traffic.unanswered,
        "server_errors": dict(traffic.server_errors),
        "examples": {"gaps": [], "duplicates": [], "reorders": [], "lost": []},
        "by_receiver": [],
    }
    ledger = traffic.ledger
    if ledger is None:
        return out
    receivers = sorted(traffic.receivers)
    _tally_streams(out, receivers, outcome.sent_by_source, ledger, plan)
    out["examples"]["gaps"] = ledger.gap_examples
    out["examples"]["duplicates"] = ledger.duplicate_examples
    out["examples"]["reorders"] = ledger.reorder_examples
    return out


def _tally_streams(
    out: dict[str, Any],
    receivers: list[int],
    sent: dict[int, int],
    ledger: LedgerReport,
    plan: RunPlan,
) -> None:
    """Compare each connected receiver's streams with what their sources sent."""
    streams = ledger.streams
    seen: set[tuple[int, int]] = set()
    for receiver in receivers:
        row = {"receiver": receiver, "lost": 0, "duplicates": 0, "reorders": 0, "gap_events": 0}
        for source in plan.sources_of(receiver):
            key = (receiver, source)
            if source not in sent:
                continue  # the sender never connected: nothing was owed
            totals = streams.get(key)
            unique = totals.unique if totals else 0
            seen.add(key)
            out["expected"] += sent[source]
            out["received"] += unique
            lost = max(0, sent[source] - unique)
            row["lost"] += lost
            if lost and len(out["examples"]["lost"]) < EXAMPLE_LIMIT:
                out["examples"]["lost"].append(
                    {
                        "receiver": receiver,
                        "source": source,
                        "sent": sent[source],
                        "received": unique,
                    }
                )
            if totals:
                row["duplicates"] += totals.duplicates
                row["reorders"] += totals.reorders
                row["gap_events"] += totals.gap_events
        for name in ("lost", "duplicates", "reorders", "gap_events"):
            out[name] += row[name]
        if (
            any(row[n] for n in ("lost", "duplicates", "reorders", "gap_events"))
            and len(out["by_receiver"]) < _RECEIVER_LIMIT
        ):
            out["by_receiver"].append(row)
    out["unexpected"] = sum(t.unique for k, t in streams.items() if k not in seen)


def _resumed(outcome: RunOutcome) -> dict[str, Any] | None:
    """With ``--resume``: how the connections that broke came back; else None."""
    resume = outcome.resume
    if not outcome.plan.resume:
        return None
    if resume is None:
        resume = ResumeReport()  # no traffic: nothing broke while it ran
    return {
        "broken": dict(resume.broken),
        "reconnects": resume.reconnects,
        "recovered": resume.recovered,
        "all_recovered": resume.recovered == resume.reconnects and not resume.failed,
        "not_recovered": dict(resume.not_recovered),
        "failed": dict(resume.failed),
        "resent": resume.resent,
    }


def _server(outcome: RunOutcome) -> dict[str, Any] | None:
    before = outcome.server_before or outcome.server_idle
    after = outcome.server_after
    if before is None or after is None:
        return None
    out: dict[str, Any] = {
        "processes": after.processes,
        "cpu_seconds": max(0.0, after.cpu_seconds - before.cpu_seconds),
        "rss_bytes_before": before.rss_bytes,
        "rss_bytes_after": after.rss_bytes,
        "pss_bytes_before": before.pss_bytes,
        "pss_bytes_after": after.pss_bytes,
    }
    connected = outcome.connect.connected
    if outcome.server_idle is not None and connected:
        out["memory_per_connection_kib"] = _per_connection(outcome.server_idle, after, connected)
        if out["cpu_seconds"] > 0:
            # From idle to every connection open: handshakes, registration, welcomes.
            out["connections_per_cpu_second"] = connected / out["cpu_seconds"]
    return out


def _per_connection(idle: ProbeSample, loaded: ProbeSample, connections: int) -> dict[str, Any]:
    pss = None
    if idle.pss_bytes is not None and loaded.pss_bytes is not None:
        pss = (loaded.pss_bytes - idle.pss_bytes) / 1024 / connections
    return {"rss": (loaded.rss_bytes - idle.rss_bytes) / 1024 / connections, "pss": pss}


def _judge(result: dict[str, Any]) -> tuple[list[str], int]:
    problems: list[str] = []
    code = EXIT_OK
    conns = result["connections"]
    failed = sum(conns["failed"].values())
    dropped = sum(conns["dropped"].values())
    if conns["connected"] == 0:
        problems.append("no connection succeeded")
        return problems, EXIT_INVALID
    integrity = result["integrity"]
    traffic = result["traffic"]
    if traffic is not None and traffic["received"] == 0:
        problems.append("nothing was received in the measured window")
        code = EXIT_INVALID
    if integrity is not None:
        for name in ("lost", "duplicates", "reorders", "mismatches", "unanswered", "unexpected"):
            if integrity[name]:
                problems.append(f"{integrity[name]} {name.replace('_', ' ')}")
                code = code or EXIT_INTEGRITY
        if integrity["server_errors"]:
            problems.append(f"server errors: {integrity['server_errors']}")
            code = code or EXIT_INTEGRITY
    if failed:
        problems.append(f"{failed} connection(s) failed: {conns['failed']}")
        code = code or EXIT_CONNECTIONS
    if dropped:
        problems.append(f"{dropped} connection(s) dropped by the server: {conns['dropped']}")
        code = code or EXIT_CONNECTIONS
    resumed = conns["resumed"]
    if resumed is not None and resumed["not_recovered"]:
        problems.append(f"rejoins not recovered: {resumed['not_recovered']}")
        code = code or EXIT_INTEGRITY
    if resumed is not None and resumed["failed"]:
        problems.append(f"connection(s) that did not come back: {resumed['failed']}")
        code = code or EXIT_CONNECTIONS
    return problems, code
