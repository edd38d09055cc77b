"""Terminal output: live progress (rich on a TTY, plain lines otherwise) and the
final tables. Progress goes to stderr so stdout carries only the results.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

_PLAIN_EVERY_S = 1.0


class Progress:
    """Receives progress callbacks from the orchestrator and shows rates."""

    def __init__(self, label: str) -> None:
        self.console = Console(stderr=True)
        self.label = label
        self.live = sys.stderr.isatty()
        self._last_print = 0.0
        self._last: tuple[float, int] | None = None
        self._status = self.console.status(label) if self.live else None
        if self._status is not None:
            self._status.start()

    def __call__(self, phase: str, elapsed_s: float, a: int, b: int) -> None:
        if phase == "connecting":
            text = f"{self.label}: connecting, {a} up, {b} failed"
        else:
            rate = 0.0
            if self._last is not None and elapsed_s > self._last[0]:
                rate = (b - self._last[1]) / (elapsed_s - self._last[0])
            self._last = (elapsed_s, b)
            text = f"{self.label}: {phase} t={elapsed_s:.1f}s sent={a} received={b} ({rate:,.0f}/s)"
        if self._status is not None:
            self._status.update(text)
        elif elapsed_s - self._last_print >= _PLAIN_EVERY_S:
            self._last_print = elapsed_s
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the live line."""
        if self._status is not None:
            self._status.stop()


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "0"
    return str(value)


def result_rows(run: dict[str, Any]) -> list[tuple[str, Any]]:
    """(metric, value) rows describing one run, in display order."""
    conns = run["connections"]
    rows: list[tuple[str, Any]] = [
        ("connections up / requested", f"{conns['connected']} / {conns['requested']}"),
        ("connection failures", conns["failed"] or 0),
        ("dropped by server", conns["dropped"] or 0),
        ("connections/s", conns["per_second"]),
    ]
    resumed = conns["resumed"]
    if resumed is not None:
        rows.append(("reconnects / recovered", f"{resumed['reconnects']} / {resumed['recovered']}"))
    for p in ("p50", "p90", "p99", "max"):
        rows.append((f"handshake {p} ms", conns["handshake_ms"][p]))
    traffic = run["traffic"]
    if traffic is not None:
        rows += [
            ("sent/s (window)", traffic["sent_per_s"]),
            ("received/s (window)", traffic["received_per_s"]),
        ]
        for p in ("p50", "p90", "p99", "max"):
            rows.append((f"latency {p} ms", traffic["latency_ms"][p]))
    integrity = run["integrity"]
    if integrity is not None:
        if integrity["expected"]:
            expected, received = integrity["expected"], integrity["received"]
            rows.append(("expected / received", f"{expected} / {received}"))
        for name in ("lost", "duplicates", "reorders", "gap_events", "mismatches", "unanswered"):
            rows.append((name.replace("_", " "), integrity[name]))
    server = run["server"]
    if server is not None:
        rows.append(("server CPU seconds", server["cpu_seconds"]))
        if "received_per_cpu_second" in server:
            rows.append(("received per server CPU-s", server["received_per_cpu_second"]))
        per_conn = server.get("memory_per_connection_kib")
        if per_conn is not None:
            rows.append(("server KiB/connection RSS", per_conn["rss"]))
            rows.append(("server KiB/connection PSS", per_conn["pss"]))
        rows.append(("server RSS MiB (after)", server["rss_bytes_after"] / 2**20))
    rows.append(("status", "; ".join(run["problems"]) or "ok"))
    return rows


def print_results(runs: list[dict[str, Any]], ratio_label: str | None) -> None:
    """Final table: one column per run; with two runs a ratio column is added."""
    console = Console()
    table = Table(title=f"shoal-bench {runs[0]['scenario']}")
    table.add_column("metric")
    for run in runs:
        # Named when it is not shoal's own, as when --compare-protocol mixes the two.
        protocol = run["plan"]["protocol"]
        header = run["label"] if protocol == "shoal" else f"{run['label']} ({protocol})"
        table.add_column(header, justify="right")
    if ratio_label is not None:
        table.add_column(ratio_label, justify="right")
    columns = [dict(result_rows(run)) for run in runs]
    for name, _ in result_rows(runs[0]):
        cells = [_fmt(col.get(name)) for col in columns]
        if ratio_label is not None:
            a, b = columns[0].get(name), columns[1].get(name)
            numeric = isinstance(a, int | float) and isinstance(b, int | float)
            cells.append(f"{b / a:.2f}x" if numeric and a else "")
        table.add_row(name, *cells)
    console.print(table)
