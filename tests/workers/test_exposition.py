"""The /metrics page, read back with prometheus-client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from shoal.core import metrics
from shoal.core.metrics import Counters
from shoal.core.scoreboard import Scoreboard
from shoal.workers import exposition


def test_the_page_holds_every_family_with_its_help_and_the_node_totals() -> None:
    board = Scoreboard(2)
    other = Counters()
    other.messages_in["room_message"] = 3
    other.closed(4001)
    other.ran(0.5)
    board.metrics.publish(1, other)
    board.metrics.count_restart("stuck")
    board.set_connections(1, 2)

    text = exposition.page(board, 0)().decode()

    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) == {
        "shoal_connections",
        *(f"shoal_{family.name}" for family in metrics.FAMILIES),
    }
    assert all(family.documentation for family in families.values())
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples["shoal_connections", ()] == 2
    # Seat 0's are this process's own counts, published by the page itself: at least 0.
    assert samples["shoal_messages_in_total", (("type", "room_message"),)] >= 3
    assert samples["shoal_connections_closed_total", (("code", "4001"),)] >= 1
    assert samples["shoal_worker_restarts_total", (("reason", "stuck"),)] == 1
    assert samples["shoal_task_run_seconds_bucket", (("le", "1.0"),)] >= 1
    assert samples["shoal_task_run_seconds_bucket", (("le", "0.1"),)] >= 0
    assert samples["shoal_reload_duration_seconds_count", ()] == 0
