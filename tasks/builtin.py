"""The built-in tasks, from the Swoole example this project descends from.

- `process_data`: statistics over a list of numbers (`{"numbers": [...]}`), computed in
  the task process: count, sum, mean, median, standard deviation, min and max.
- `noop`: returns its data unchanged (health checks, and `shoal-bench task`).
- `send_email`: an email over SMTP to `tasks.smtp` (`{"to", "subject", "body"}`); a
  connection refused, a timeout or a server that hung up is retried, a refusal is not.
- `broadcast_delayed`: waits `delay` seconds (at most an hour), then sends `message` to
  every connection of every node, as the chat protocol's `broadcast` from the user who
  dispatched the job.
- `pusher_webhook`: posts a Pusher webhook the workers signed and queued
  (`shoal.core.webhooks`); an unreachable receiver, a 5xx or a 429 is retried, another
  refusal is not.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import statistics
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import aiosmtplib

from shoal.core import protocol, webhooks
from shoal.core.task import TaskContext, task

_MAX_DELAY = 3600.0
_MAX_RECIPIENTS = 100
_MAX_BODY = 1_000_000
# One address, no display name, no line break (a header injection).
_ADDRESS = re.compile(r"[^@\s<>,;]{1,64}@[^@\s<>,;]{1,255}")
_HEADER = re.compile(r"[^\r\n]{0,998}")
_WEBHOOK_TIMEOUT = 10.0
_TRANSIENT_SMTP = (
    aiosmtplib.SMTPConnectError,
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    ConnectionError,
)


@task("noop")
async def noop(ctx: TaskContext, data: Any) -> Any:
    return data


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
    # The chat protocol's own broadcast, from the user who dispatched the job.
    broadcast = {
        "type": "broadcast",
        "from": ctx.user_id,
        "message": data["message"],
        "timestamp": protocol.timestamp(time.time()),
    }
    workers = await ctx.emitter.to_all().send(broadcast)
    return {"delivered_to_workers": workers}


@task("send_email", retry_on=_TRANSIENT_SMTP)
async def send_email(ctx: TaskContext, data: Any) -> dict[str, Any]:
    """Send `{"to": ..., "subject": ..., "body": ...}` through `tasks.smtp`."""
    if not isinstance(data, dict):
        raise ValueError("data must be an object with to, subject and body")
    recipients = data.get("to")
    if isinstance(recipients, str):
        recipients = [recipients]
    if (
        not isinstance(recipients, list)
        or not 0 < len(recipients) <= _MAX_RECIPIENTS
        or not all(isinstance(r, str) and _ADDRESS.fullmatch(r) for r in recipients)
    ):
        raise ValueError(f"data.to must be 1 to {_MAX_RECIPIENTS} email addresses")
    subject, body = data.get("subject"), data.get("body")
    if not isinstance(subject, str) or not _HEADER.fullmatch(subject):
        raise ValueError("data.subject must be one line of text, at most 998 characters")
    if not isinstance(body, str) or len(body) > _MAX_BODY:
        raise ValueError(f"data.body must be text of at most {_MAX_BODY} characters")
    smtp = ctx.config["smtp"]
    message = EmailMessage()
    message["From"] = smtp["from_address"]
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    # The task id and a random part: unique, and short enough never to be folded.
    domain = parseaddr(smtp["from_address"])[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = f"<{ctx.task_id}.{secrets.token_hex(8)}@{domain}>"
    message.set_content(body)
    refused, reply = await aiosmtplib.send(
        message,
        hostname=smtp["host"],
        port=smtp["port"],
        username=smtp["username"],
        password=smtp["password"],
        start_tls=smtp["starttls"],
        use_tls=smtp["tls"],
        timeout=smtp["timeout"],
    )
    return {
        "message_id": message["Message-ID"],
        "accepted": [r for r in recipients if r not in refused],
        "reply": reply,
    }


class WebhookUndelivered(OSError):
    """A webhook's receiver could not be reached, or answered 5xx or 429: worth retrying."""


@task(webhooks.TASK, retry_on=(WebhookUndelivered,))
async def pusher_webhook(ctx: TaskContext, data: Any) -> dict[str, Any]:
    """POST `{"url", "body", "headers"}` (`shoal.core.webhooks.dispatches`)."""
    if not isinstance(data, dict) or not isinstance(data.get("body"), bytes):
        raise ValueError("data must be a webhook queued by shoal.core.webhooks")
    status = await asyncio.to_thread(_post, data["url"], data["body"], data["headers"])
    return {"status": status}


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=_WEBHOOK_TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise WebhookUndelivered(f"{url} answered {exc.code}") from exc
        raise ValueError(f"{url} refused the webhook with {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise WebhookUndelivered(f"{url} unreachable: {exc}") from exc
