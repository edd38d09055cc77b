"""The built-in tasks, from the Swoole example this project descends from.

- `process_data`: statistics over a list of numbers (`{"numbers": [...]}`), computed in
  the task process: count, sum, mean, median, standard deviation, min and max.
- `broadcast_delayed`: waits `delay` seconds (at most an hour), then sends `message` to
  every connection of every node.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from shoal.core.task import TaskContext, task

_MAX_DELAY = 3600.0


@task("process_data")
def process_data(ctx: TaskContext, data: Any) -> dict[str, Any]:
    numbers = data.get("numbers") if isinstance(data, dict) else None
    if not isinstance(numbers, list) or not numbers:
        raise ValueError("data.numbers must be a non-empty list of numbers")
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        raise ValueError("data.numbers must hold numbers only")
    return {
        "count": len(numbers),
        "sum": sum(numbers),
        "mean": statistics.fmean(numbers),
        "median": statistics.median(numbers),
        "stdev": statistics.pstdev(numbers),
        "min": min(numbers),
        "max": max(numbers),
    }


@task("broadcast_delayed")
async def broadcast_delayed(ctx: TaskContext, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or "message" not in data:
        raise ValueError("data.message is required")
    delay = data.get("delay", 0)
    if (
        not isinstance(delay, int | float)
        or isinstance(delay, bool)
        or not 0 <= delay <= _MAX_DELAY
    ):
        raise ValueError(f"data.delay must be a number of seconds from 0 to {_MAX_DELAY:g}")
    await asyncio.sleep(delay)
    message = data["message"]
    payload = message if isinstance(message, dict) else {"type": "broadcast", "message": message}
    workers = await ctx.emitter.to_all().send(payload)
    return {"delivered_to_workers": workers}
