"""The task queue's replies parsed with no Redis: what a worker and a pool read back."""

from __future__ import annotations

import msgpack
import pytest

from shoal.core import envelope, jobs
from shoal.core.envelope import TaskDone
from shoal.core.errors import EnvelopeError
from shoal.core.keys import Keys

KEYS = Keys("p")


def test_status_reads_an_outcome_then_a_running_or_queued_job() -> None:
    body = msgpack.packb({"sum": 3})
    done = jobs.parse_status(
        "1-0", [[b"state", b"done", b"body", body, b"name", b"add", b"attempts", b"1"], []]
    )
    assert done.state == "done"
    assert done.client_message() == {
        "type": "task_result", "task_id": "1-0", "task": "add", "result": {"sum": 3}
    }  # fmt: skip
    error = msgpack.packb({"type": "ValueError", "message": "bad"})
    failed = jobs.parse_status("1-0", [[b"state", b"failed", b"body", error, b"name", b"add"], []])
    assert failed.client_message()["error"] == {"type": "ValueError", "message": "bad"}
    entry = [[b"1-0", [b"name", b"add"]]]
    running = jobs.parse_status("1-0", [[b"attempts", b"1"], entry])
    assert running.client_message() == {"type": "task_status", "task_id": "1-0", "state": "running"}
    assert jobs.parse_status("1-0", [[], entry]).state == "queued"
    assert jobs.parse_status("1-0", [[], []]).state == "unknown"


def test_status_for_a_user_hides_the_jobs_of_others() -> None:
    body = msgpack.packb(3)
    done = [[b"state", b"done", b"body", body, b"name", b"add", b"user", b"ann"], []]
    assert jobs.parse_status("1-0", done, "ann").state == "done"
    assert jobs.parse_status("1-0", done, "bo").state == "unknown"
    queued = [[], [[b"1-0", [b"name", b"add", b"user", b"ann"]]]]
    assert jobs.parse_status("1-0", queued, "ann").state == "queued"
    assert jobs.parse_status("1-0", queued, "bo").state == "unknown"
    assert jobs.parse_status("1-0", [[], []], "ann").state == "unknown"


def test_read_and_reclaim_replies_become_jobs_and_skip_deleted_entries() -> None:
    fields = [b"name", b"add", b"data", b"\x81\xa1a\x01", b"conn", b"w.1", b"user", b"ann"]
    job = jobs.Job("5-0", "add", b"\x81\xa1a\x01", "w.1", "ann")
    assert jobs.parse_read(None) == []
    assert jobs.parse_read([[b"p:tasks", [[b"5-0", fields]]]]) == [job]
    # Redis 6.2 lists an entry deleted meanwhile with no fields; 7 lists it apart.
    assert jobs.parse_reclaim([b"0-0", [[b"4-0", None], [b"5-0", fields]]]) == [job]
    assert jobs.parse_reclaim([b"0-0", [[b"5-0", fields]], [b"4-0"]]) == [job]


def test_gone_consumers_are_silent_hold_nothing_and_are_not_this_one() -> None:
    reply = [
        [b"name", b"dead", b"pending", 0, b"idle", 9000],
        [b"name", b"holding", b"pending", 2, b"idle", 9000],
        [b"name", b"idle-but-recent", b"pending", 0, b"idle", 100],
        [b"name", b"me", b"pending", 0, b"idle", 9000, b"inactive", 9000],
    ]
    assert jobs.parse_gone(reply, 4000, keep="me") == ["dead"]


def test_pack_refuses_what_msgpack_cannot_carry() -> None:
    with pytest.raises(TypeError, match="cannot be sent as msgpack"):
        jobs.pack({"when": object()})
    assert jobs.unpack(jobs.pack({"a": [1, 2.5, None, b"x"]})) == {"a": [1, 2.5, None, b"x"]}


def test_dispatch_is_one_script_on_the_stream_key_alone() -> None:
    command = jobs.dispatch(KEYS, "add", b"\x90", conn="w.1", user="ann", limit=10)
    assert command[0] == "EVAL" and command[2:4] == (1, "p:tasks")
    assert command[4:] == (10, "add", b"\x90", "w.1", "ann")


def test_task_done_envelope_round_trip_and_malformed() -> None:
    data = envelope.task_done("1-0", "add", True, b"\x03", ["w.1", "w.2"])
    assert envelope.unpack(data) == TaskDone("1-0", "add", True, b"\x03", ["w.1", "w.2"])
    bad = msgpack.packb((1, 3, "1-0", "add", "yes", b"\x03", ["w.1"]))
    with pytest.raises(EnvelopeError, match="malformed bus envelope of kind 3"):
        envelope.unpack(bad)
