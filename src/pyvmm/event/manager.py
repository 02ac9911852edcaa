"""One epoll loop for host I/O and device work, so devices need no threads of their own.

Callbacks run on the loop's thread. ``add``/``remove`` may be called from any thread
(epoll_ctl is thread-safe); ``call_soon`` queues work from other threads and wakes
the loop through an eventfd; ``call_later`` runs work after a delay (rate limiters
waiting for tokens) by shortening the next epoll wait, so it needs no timer fd.

Containment: every callback — fd readiness, ``call_soon`` work, timers — runs inside
one wrapper, so nothing a callback raises ends the loop (and with it the VMM or a
backend serving many sessions). An exception is logged once per (callback, kind) and
counted: a ``PyvmmError`` as a contained fault (a guest or a peer broke a rule the
code raises on purpose), anything else as a VMM bug. A callback registered with
``fail`` has that called with the reason, which moves its owner to its spec's error
state (virtio DEVICE_NEEDS_RESET, a closed session, ...): its state may be half
updated, so it must not go on as if nothing happened.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from pyvmm.errors import PyvmmError
from pyvmm.ratelimit_log import OnceLog

Callback = Callable[[int, int], None]  # (fd, events)
Fail = Callable[[str], None]  # the owner's error transition, given the reason

log = logging.getLogger("pyvmm")


class EventManager:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._cbs: dict[int, tuple[Callback, Fail | None]] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending: list[tuple[Callable[[], None], Fail | None]] = []
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None], Fail | None]] = []
        self._seq = itertools.count()
        self._ep.register(self._wake, select.EPOLLIN)
        self.errors = OnceLog()
        self.faults = 0  # PyvmmErrors that reached the loop (owner failed, loop went on)
        self.bugs = 0  # any other exception: a VMM bug, contained

    def add(self, fd: int, callback: Callback, events: int = select.EPOLLIN,
            fail: Fail | None = None) -> None:
        self._cbs[fd] = (callback, fail)
        self._ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        """Change what ``fd`` is watched for (EPOLLOUT while a send is pending)."""
        if fd in self._cbs:
            self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._cbs.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._cbs

    def call_soon(self, fn: Callable[[], None], fail: Fail | None = None) -> None:
        with self._lock:
            self._pending.append((fn, fail))
        os.eventfd_write(self._wake, 1)

    def call_later(self, delay: float, fn: Callable[[], None], fail: Fail | None = None) -> None:
        """Run ``fn`` on the loop after ``delay`` seconds (from any thread)."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn, fail))
        os.eventfd_write(self._wake, 1)

    def contain(self, fn: object, e: Exception, fail: Fail | None) -> None:
        """What the loop does with an exception a callback raised (also for callers that
        run callbacks of their own, such as a pool's completions)."""
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        if isinstance(e, PyvmmError):
            self.faults += 1
            what = "fault"
        else:
            self.bugs += 1
            what = "VMM bug"
        self.errors.warn(f"{name}:{type(e).__name__}",
                         f"event loop: {what} in {name}: {e!r}; contained")
        if fail is not None:
            try:
                fail(f"{type(e).__name__}: {e}")
            except Exception as e2:  # the error path itself failed: still contain it
                self.bugs += 1
                self.errors.warn(f"fail:{name}", f"event loop: error handler of {name} "
                                 f"raised {e2!r}; contained")

    def _run_timers(self) -> int:
        now, due = time.monotonic(), []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers))
        for _, _, fn, fail in due:
            try:
                fn()
            except Exception as e:
                self.contain(fn, e, fail)
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
                for fn, fail in work:
                    try:
                        fn()
                    except Exception as e:
                        self.contain(fn, e, fail)
                    n += 1
                continue
            entry = self._cbs.get(fd)
            if entry is not None:
                try:
                    entry[0](fd, ev)
                except Exception as e:
                    self.contain(entry[0], e, entry[1])
                n += 1
        return n

    def close(self) -> None:
        self._ep.close()
        os.close(self._wake)
