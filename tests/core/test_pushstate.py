"""Pusher channel state in Redis: the transitions Pusher announces are decided once, by
atomic counters, across workers; a cleanup reports the same transitions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shoal.core.keys import Keys
from shoal.core.pushstate import Change, Channels, Left
from shoal.core.registry import Registry, Snapshot, connect

from support import RedisServer


@pytest.fixture
async def state(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[Channels, Registry]]:
    client = connect(redis_server.url)
    keys = Keys(prefix)
    yield Channels(client, keys), Registry(client, keys, "n1", "n1.0.1")
    await client.close()


def snapshot(cid: str, pushed: tuple[tuple[str, str, str, object], ...] = ()) -> Snapshot:
    return Snapshot(cid=cid, user="#pusher:1", addr="a", at=1, meta=None, pushed=pushed)


async def test_occupied_vacated_and_members_are_counted_once(
    state: tuple[Channels, Registry],
) -> None:
    channels, registry = state
    for cid in ("1.1", "1.2", "2.1"):
        await registry.submit_connection(snapshot(cid))
    assert (await channels.subscribe("1", "news", "1.1")).occupied
    assert not (await channels.subscribe("1", "news", "2.1")).occupied
    assert await channels.occupied("1") == {"news": 2}
    assert await channels.occupied("2") == {}  # apps never see each other's channels

    first = await channels.subscribe("1", "presence-r", "1.1", "ann", {"n": "Ann"})
    assert first == Change(subscriptions=1, connections=1, members=1)
    again = await channels.subscribe("1", "presence-r", "1.2", "ann", {"n": "Ann"})
    assert again == Change(subscriptions=2, connections=2, members=1)  # no new member
    assert await channels.members("1", "presence-r") == {"ann": {"n": "Ann"}}
    assert await channels.user_counts("1", ["presence-r"]) == [1]

    assert (await channels.unsubscribe("1", "presence-r", "1.2", "ann")).connections == 1
    last = await channels.unsubscribe("1", "presence-r", "1.1", "ann")
    assert last == Change(subscriptions=0, connections=0, members=0) and last.vacated
    assert await channels.members("1", "presence-r") == {}
    assert (await channels.unsubscribe("1", "news", "2.1")).subscriptions == 1


async def test_removing_a_connection_reports_what_its_subscriptions_changed(
    state: tuple[Channels, Registry],
) -> None:
    channels, registry = state
    await registry.submit_connection(snapshot("1.1"))
    await registry.submit_connection(snapshot("1.2"))
    await channels.subscribe("1", "presence-r", "1.1", "ann", None)
    await channels.subscribe("1", "presence-r", "1.2", "bo", None)
    await channels.subscribe("1", "news", "1.1")

    departure = await registry.remove_connection("1.1")
    assert departure is not None
    assert sorted(departure.pushed, key=lambda left: left.channel) == [
        Left("1", "news", "", Change(0)),
        Left("1", "presence-r", "ann", Change(subscriptions=1, connections=0, members=1)),
    ]
    assert await channels.occupied("1") == {"presence-r": 1}
    assert await channels.members("1", "presence-r") == {"bo": None}


async def test_a_write_back_restores_subscriptions(state: tuple[Channels, Registry]) -> None:
    channels, registry = state
    await registry.resync([snapshot("1.1", (("1", "presence-r", "ann", {"n": 1}),))])
    assert await channels.occupied("1") == {"presence-r": 1}
    assert await channels.members("1", "presence-r") == {"ann": {"n": 1}}
    departure = await registry.remove_connection("1.1")
    assert departure is not None and departure.pushed[0].change.connections == 0
