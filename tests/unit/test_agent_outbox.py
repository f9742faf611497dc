"""The outbox: order kept, only the newest retained status, bounded."""

from __future__ import annotations

from chaos_agent.agent import Outbox, Outgoing


def test_newest_status_replaces_older_ones() -> None:
    """Test that a retained message replaces a waiting one on the same topic
    while acks keep their order."""
    outbox = Outbox()
    outbox.put(Outgoing("status", b"old", retain=True))
    outbox.put(Outgoing("ack", b"1"))
    outbox.put(Outgoing("status", b"new", retain=True))
    outbox.put(Outgoing("ack", b"2"))

    assert [m.payload for m in outbox.drain()] == [b"1", b"new", b"2"]


def test_full_outbox_drops_the_oldest() -> None:
    """Test that beyond its limit the outbox drops the oldest message."""
    outbox = Outbox(limit=3)
    for number in range(5):
        outbox.put(Outgoing("ack", str(number).encode()))

    assert [m.payload for m in outbox.drain()] == [b"2", b"3", b"4"]


async def test_failed_publish_goes_back_to_the_head() -> None:
    """Test that a message whose publish failed is sent first next time, and
    that flushed() waits for it."""
    outbox = Outbox()
    outbox.put(Outgoing("ack", b"1"))
    outbox.put(Outgoing("ack", b"2"))

    first = await outbox.get()
    outbox.put_back(first)
    again = await outbox.get()
    outbox.done()

    assert again.payload == b"1"
    assert [m.payload for m in outbox.drain()] == [b"2"]
    await outbox.flushed()
