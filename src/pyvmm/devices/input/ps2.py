"""What the PS/2 keyboard and mouse share: a bounded output queue toward the controller,
the lock and wake-up the controller gives them, and the replies every PS/2 device uses.

Byte names from the IBM PS/2 Technical Reference and Linux
``drivers/input/serio/libps2.h`` / ``atkbd.c`` / ``psmouse.h``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from pyvmm.ratelimit_log import OnceLog

PS2_RET_ACK = 0xFA
PS2_RET_NAK = 0xFE  # "resend": what a device answers to a byte it does not take
PS2_RET_ERR = 0xFC
PS2_RET_BAT = 0xAA  # basic assurance test passed

# A keyboard's buffer on real hardware is 16 bytes; the host can inject faster than a
# person types, so the queue is larger but bounded. Host input may fill it only up to
# QUEUE_SIZE - REPLY_RESERVE, so a command's reply always fits (QEMU keeps a reserve
# the same way).
QUEUE_SIZE = 256
REPLY_RESERVE = 16


class Ps2Port:
    """One device on a controller port. ``receive`` is a byte the controller sent it;
    ``pop`` takes the next byte toward the controller. The controller sets ``lock``
    (its own, so register accesses and host input are serialised) and ``notify``
    (called whenever a byte is queued, so it can fill its output buffer)."""

    def __init__(self) -> None:
        self.lock: threading.RLock = threading.RLock()
        self.notify: Callable[[], None] = lambda: None
        self.queue: deque[int] = deque()
        self.errors = OnceLog()
        self.host_dropped = 0  # host events that did not fit (or came while disabled)
        self.replies_dropped = 0  # replies beyond the queue (a command flood)

    # --- toward the controller --------------------------------------------------------
    def pending(self) -> bool:
        return bool(self.queue)

    def pop(self) -> int:
        return self.queue.popleft()

    def _reply(self, *data: int) -> None:
        room = QUEUE_SIZE - len(self.queue)
        if len(data) > room:
            self.replies_dropped += len(data) - room
            self.errors.warn("ps2-flood", f"{type(self).__name__}: command flood, "
                             f"replies beyond {QUEUE_SIZE} queued bytes dropped")
            data = data[:room]
        self.queue.extend(data)
        if data:
            self.notify()

    def _host(self, data: bytes) -> bool:
        """Queue one host event whole, or not at all (no torn scan code)."""
        if len(self.queue) + len(data) > QUEUE_SIZE - REPLY_RESERVE:
            self.host_dropped += 1
            return False
        self.queue.extend(data)
        self.notify()
        return True

    def receive(self, byte: int) -> None:
        raise NotImplementedError
