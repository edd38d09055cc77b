"""Pusher webhooks, with no I/O: what each transition sends, signed as Pusher signs it,
queued as a job for the task pool, which delivers it and retries (`pusher_webhook` in
`shoal.tasks.builtin`).

A webhook is `POST {"time_ms": ..., "events": [...]}` with `X-Pusher-Key` and
`X-Pusher-Signature` (HMAC-SHA256 of the body with the app's secret). Occupied, vacated,
member added and member removed are decided by the atomic counters of
`shoal.core.pushstate`, so each fires once across every worker and node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from shoal.config.model import PusherAppConfig
from shoal.core import jobs, pusher
from shoal.core.keys import Keys
from shoal.core.pushstate import Change, Left

TASK = "pusher_webhook"

Event = dict[str, Any]
Command = tuple[Any, ...]


def transitions(channel: str, member: str, change: Change, *, joined: bool) -> list[Event]:
    """The events a subscription (`joined`) or an unsubscription changed."""
    events: list[Event] = []
    if joined and change.occupied:
        events.append({"name": "channel_occupied", "channel": channel})
    if member and joined and change.connections == 1:
        events.append({"name": "member_added", "channel": channel, "user_id": member})
    if member and not joined and change.connections == 0:
        events.append({"name": "member_removed", "channel": channel, "user_id": member})
    if not joined and change.vacated:
        events.append({"name": "channel_vacated", "channel": channel})
    return events


def left(departed: Left) -> list[Event]:
    """The events of a subscription a cleanup removed."""
    return transitions(departed.channel, departed.member, departed.change, joined=False)


def request(app: PusherAppConfig, events: list[Event], now: float) -> dict[str, Any]:
    """The body and headers of one webhook carrying `events`."""
    body = orjson.dumps({"time_ms": int(now * 1000), "events": events})
    headers = {
        "Content-Type": "application/json",
        "X-Pusher-Key": app.key,
        "X-Pusher-Signature": pusher.webhook_signature(app.secret_value(), body),
    }
    return {"body": body, "headers": headers}


def dispatches(
    keys: Keys, app: PusherAppConfig, events: Iterable[Event], now: float, limit: int
) -> list[Command]:
    """The commands that queue `events` for each of `app`'s webhooks that wants some
    of them (`tasks.max_pending` bounds the queue: past it, a webhook is dropped)."""
    events = list(events)
    commands = []
    for hook in app.webhooks:
        wanted = [event for event in events if event["name"] in hook.event_types]
        if wanted:
            job = {"url": hook.url, **request(app, wanted, now)}
            commands.append(jobs.dispatch(keys, TASK, jobs.pack(job), conn="", user="",
                                          limit=limit))  # fmt: skip
    return commands
