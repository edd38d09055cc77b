"""What a connection with permessage-deflate may make its worker inflate.

With compression, a client's bytes on the wire no longer bound the work they cause: a
1 KiB frame inflates to 1 MiB, which the worker then decodes, parses, and may compress
again to answer. So `transport.WebSocket` hands websockets the frames of such a
connection one at a time and charges each frame's inflated size to a `Budget`; when the
budget is spent, it stops reading from the client until it refills (the client is
slowed by TCP flow control, not closed).
"""

from __future__ import annotations

_MASKED = 0x80
_LENGTH = 0x7F


class Budget:
    """A token bucket of inflated bytes per second, allowed to go into debt.

    Its capacity is one second of `rate`. A frame is handled while the balance is
    positive and then charged its actual size, so a message larger than the capacity
    still passes (after which the connection waits until the debt is paid off).
    """

    __slots__ = ("balance", "capacity", "rate", "stamp")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.capacity = float(rate)
        self.balance = float(rate)
        self.stamp = now

    def spend(self, size: int, now: float) -> float:
        """Charge `size` inflated bytes at `now`.

        Returns:
            0.0 if more frames may be handled now; otherwise the seconds to wait until
            the balance is positive again (the caller stops reading meanwhile).
        """
        balance = min(self.capacity, self.balance + (now - self.stamp) * self.rate) - size
        self.balance = balance
        self.stamp = now
        return 0.0 if balance > 0 else -balance / self.rate + 0.001


def frame_size(data: bytes, at: int) -> int:
    """The length on the wire (header and payload) of the client frame that starts at
    offset `at` of `data`, or 0 if its header is not all there yet."""
    available = len(data) - at
    if available < 2:
        return 0
    second = data[at + 1]
    header = 6 if second & _MASKED else 2
    length = second & _LENGTH
    if length == 126:
        if available < 4:
            return 0
        length = int.from_bytes(data[at + 2 : at + 4])
        header += 2
    elif length == 127:
        if available < 10:
            return 0
        length = int.from_bytes(data[at + 2 : at + 10])
        header += 8
    return header + length
