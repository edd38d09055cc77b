"""Self-contained HTML report: inline SVG charts, no external resources."""

from __future__ import annotations

import html
import math
from typing import Any

_W, _H, _PAD = 640, 260, 48
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
# Latency chart x axis: percentiles spread as -log10(1 - p), so tails get room.
_PCT_TICKS = (0.0, 90.0, 99.0, 99.9, 99.99)


def _svg_lines(
    series: list[tuple[str, list[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    x_ticks: list[tuple[float, str]] | None = None,
) -> str:
    points = [p for _, s in series for p in s]
    if not points:
        return "<p>no data</p>"
    x_max = max(p[0] for p in points) or 1.0
    y_max = max(p[1] for p in points) or 1.0

    def sx(x: float) -> float:
        return _PAD + x / x_max * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD + -y / y_max * (_H - 2 * _PAD)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'font-family="sans-serif" font-size="11">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#333"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#333"/>',
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="12" y="{_H / 2}" transform="rotate(-90 12 {_H / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>',
    ]
    for k in range(5):
        y = y_max * k / 4
        parts.append(f'<text x="{_PAD - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:,.3g}</text>')
    for x, text in x_ticks or [(x_max * k / 4, f"{x_max * k / 4:.3g}") for k in range(5)]:
        parts.append(
            f'<text x="{sx(x):.1f}" y="{_H - _PAD + 14}" text-anchor="middle">'
            f"{html.escape(text)}</text>"
        )
    for n, (name, data) in enumerate(series):
        color = _COLORS[n % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        parts.append(
            f'<text x="{_W - _PAD}" y="{_PAD + 14 * n}" fill="{color}" '
            f'text-anchor="end">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _stretch(pct: float) -> float:
    return -math.log10(max(1e-5, 1.0 - pct / 100.0))


def _run_name(run: dict[str, Any], index: int) -> str:
    return f"{run['label']}#{index} {run['url']}"


def render_report(document: dict[str, Any]) -> str:
    """The whole HTML page for a result document (schema shoal-bench/1)."""
    runs = document["runs"]
    throughput: list[tuple[str, list[tuple[float, float]]]] = []
    latency: list[tuple[str, list[tuple[float, float]]]] = []
    handshake_rows = []
    for i, run in enumerate(runs):
        name = _run_name(run, i)
        traffic = run["traffic"]
        if traffic is not None:
            step = traffic["timeline"]["step_s"]
            throughput.append(
                (name, [(k * step, n / step) for k, n in enumerate(traffic["timeline"]["counts"])])
            )
            latency.append(
                (name, [(_stretch(pct), ms) for ms, pct in traffic["latency_distribution"]])
            )
        hs = run["connections"]["handshake_ms"]
        handshake_rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{run['connections']['connected']}</td>"
            f"<td>{run['connections']['per_second']:,.1f}</td><td>{hs['p50']:.3f}</td>"
            f"<td>{hs['p99']:.3f}</td><td>{hs['max']:.3f}</td>"
            f"<td>{html.escape('; '.join(run['problems']) or 'ok')}</td></tr>"
        )
    ticks = [(_stretch(p), f"p{p:g}") for p in _PCT_TICKS]
    body = [
        f"<h1>shoal-bench {html.escape(runs[0]['scenario'])}</h1>",
        f"<p>{html.escape(' '.join(document['argv']))}</p>",
        f"<p>host: {html.escape(str(document['host']))}</p>",
        "<h2>Connections</h2><table><tr><th>run</th><th>up</th><th>per s</th>"
        "<th>handshake p50 ms</th><th>p99 ms</th><th>max ms</th><th>status</th></tr>",
        *handshake_rows,
        "</table>",
    ]
    if throughput:
        body += [
            "<h2>Throughput over time (received per second, warmup included)</h2>",
            _svg_lines(throughput, "seconds since start", "messages/s"),
            "<h2>Latency distribution (measured window)</h2>",
            _svg_lines(latency, "percentile", "ms", ticks),
        ]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>shoal-bench</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
