"""One epoll loop for host I/O and device work, so devices need no threads of their own.

Callbacks run on the loop's thread. ``add``/``remove`` may be called from any thread
(epoll_ctl is thread-safe); ``call_soon`` queues work from other threads and wakes
the loop through an eventfd; ``call_later`` runs work after a delay (rate limiters
waiting for tokens) by shortening the next epoll wait, so it needs no timer fd.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Callable

Callback = Callable[[int, int], None]  # (fd, events)


class EventManager:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._cbs: dict[int, Callback] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ep.register(self._wake, select.EPOLLIN)

    def add(self, fd: int, callback: Callback, events: int = select.EPOLLIN) -> None:
        self._cbs[fd] = callback
        self._ep.register(fd, events)

    def remove(self, fd: int) -> None:
        if self._cbs.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(fn)
        os.eventfd_write(self._wake, 1)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop after ``delay`` seconds (from any thread)."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
        os.eventfd_write(self._wake, 1)

    def _run_timers(self) -> int:
        now, due = time.monotonic(), []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for fn in due:
            fn()
        return len(due)

    def run_once(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (None: forever); returns events handled."""
        if self._timers:  # unlocked peek: a timer added meanwhile also wakes the loop
            with self._lock:
                if self._timers:
                    first = max(0.0, self._timers[0][0] - time.monotonic())
                    timeout = first if timeout is None else min(timeout, first)
        try:
            ready = self._ep.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return 0
        n = self._run_timers() if self._timers else 0
        for fd, ev in ready:
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                with self._lock:
                    work, self._pending = self._pending, []
                for fn in work:
                    fn()
                    n += 1
                continue
            cb = self._cbs.get(fd)
            if cb is not None:
                cb(fd, ev)
                n += 1
        return n

    def close(self) -> None:
        self._ep.close()
        os.close(self._wake)
