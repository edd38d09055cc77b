"""The `/metrics` page: the node's totals (`shoal.core.metrics`), in Prometheus text format.

Any worker answers for the whole node: it publishes its own counters first, so that
what it counted itself is exact; the other processes' are at most a second old.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from shoal.core import metrics
from shoal.core.scoreboard import Scoreboard

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Node(Collector):
    """The node's metric families, read from the shared memory at each collection."""

    def __init__(self, scoreboard: Scoreboard) -> None:
        self.scoreboard = scoreboard

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "shoal_connections",
            "WebSocket connections open on the node (counted from their admission).",
            value=self.scoreboard.connections(),
        )
        for family, values in metrics.split(self.scoreboard.metrics.totals()):
            yield _family(family, values)


def _family(family: metrics.Family, values: list[float]) -> Metric:
    name = f"shoal_{family.name}"
    if family.kind == "histogram":
        *buckets, total = values
        return HistogramMetricFamily(
            name,
            family.help,
            buckets=list(zip(family.values[:-1], buckets, strict=True)),
            sum_value=total,
        )
    if family.kind == "summary":
        count, total = values
        return SummaryMetricFamily(name, family.help, count_value=int(count), sum_value=total)
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    if not family.label:
        return kind(name, family.help, value=values[0])
    labelled = kind(name, family.help, labels=[family.label])
    for value, amount in zip(family.values, values, strict=True):
        labelled.add_metric([value], amount)
    return labelled


def page(scoreboard: Scoreboard, seat: int) -> Callable[[], bytes]:
    """What answers `/metrics` in the worker in `seat`: a function that returns the
    page's body (its type is `CONTENT_TYPE`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Node(scoreboard))

    def render() -> bytes:
        scoreboard.metrics.publish(seat, metrics.counters)
        return generate_latest(registry)

    return render
