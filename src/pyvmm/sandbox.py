"""Seccomp allow-lists per thread kind, through libseccomp (the ``pyseccomp`` binding).

A VMM's threads each do a narrow job, so each gets a filter listing the system calls
that job needs (Firecracker's per-thread filters; crosvm's per-device jails):

- ``vcpu``: KVM_RUN and the exits' device code (port/MMIO handlers, eventfd writes);
- ``event-loop``: the devices' host side — epoll, eventfds, timerfds, TAP/socket I/O,
  the vhost-user peers (AF_UNIX only), guest-memory reads and writes;
- ``io-pool``: block I/O that would block (preadv/pwritev, fsync, fallocate);
- ``api``: the control API's thread (AF_UNIX listening socket);
- ``backend``: the whole process of ``pyvmm backend ...`` once it is set up.

Every kind starts from what any Python thread needs (memory, futexes, signals,
clocks, reading and writing fds it already holds). What no kind gets: exec, fork (a
new process: ``clone`` without CLONE_THREAD), ptrace and process_vm_*, mount and
namespaces, module and kexec loading, bpf, perf, keyrings, privilege changes, and
sockets other than AF_UNIX (except where a kind lists AF_INET/AF_INET6: none do).

**Refusal, not death.** In ``enforce`` a call outside the list fails with EPERM; in
Python that is an ``OSError``, which a device's contained error path already turns
into a logged device error while the VM goes on. Firecracker kills the process
instead; a Python VMM whose interpreter may make a call nobody listed (a rarely taken
path in the standard library) would then die for it. ``log`` allows everything but
has the kernel log what enforce would refuse (SCMP_ACT_LOG), to derive or check a
list. How the lists were derived: docs/security.md, "Seccomp".

The main thread is never filtered: it builds the machine, waits, and writes the
report and the files the user asked for; a filter on it would also outlive ``run()``
in a program that embeds pyvmm (a test process).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import socket
import threading
from typing import Any

from pyvmm.ratelimit_log import OnceLog


class SeccompMode(enum.StrEnum):
    ENFORCE = "enforce"
    LOG = "log"
    OFF = "off"


# --- the lists -------------------------------------------------------------------------
# What the interpreter itself needs in any thread: allocation (pymalloc arenas are
# mmap'd), the GIL and locks (futex), signals (the vCPU kick is a signal; Python's
# handlers run on the main thread but every thread takes and masks them), clocks and
# sleeps, random (hash seeds, uuid), fds it already holds, thread exit.
PYTHON = (
    "read", "write", "readv", "writev", "close", "lseek", "fstat", "newfstatat", "statx",
    "fcntl", "dup", "dup3", "futex", "mmap", "munmap", "mremap", "mprotect", "madvise",
    "brk", "rt_sigprocmask", "rt_sigaction", "rt_sigreturn", "sigaltstack", "tgkill",
    "gettid", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "sched_yield", "sched_getaffinity", "getrandom", "getrusage", "times", "sysinfo",
    "uname", "exit", "exit_group", "set_robust_list", "rseq", "restart_syscall",
    "poll", "ppoll", "select", "pselect6", "prlimit64", "getcwd", "membarrier",
)
# The vCPU thread runs KVM_RUN and the device code of every exit: register accesses
# reprogram timers (timerfd_settime), enable queues and MSI-X vectors (new eventfds,
# their KVM_IOEVENTFD/KVM_IRQFD ioctls, epoll registration), talk to a vhost-user
# backend at DRIVER_OK (on the socket it already holds), and serve requests whose
# notify exit they handle (block I/O, flushes, discards).
VCPU = (*PYTHON, "ioctl", "eventfd2", "epoll_ctl", "timerfd_settime", "timerfd_gettime",
        "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "fsync",
        "fdatasync", "fallocate", "sendmsg", "recvmsg", "sendto", "recvfrom",
        "readlink", "readlinkat")
# The host side of devices. ``openat`` is here for the files the event loop opens at
# run time (a serial ``file:`` end, a display's PNGs); ``socket`` is AF_UNIX only.
EVENT_LOOP = (
    *PYTHON, "ioctl", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2",
    "timerfd_create", "timerfd_settime", "timerfd_gettime", "pipe2",
    "recvfrom", "recvmsg", "sendto", "sendmsg", "accept4", "connect", "bind", "listen",
    "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair",
    "openat", "unlink", "rename", "fsync", "fdatasync", "fallocate", "ftruncate",
    "memfd_create", "io_uring_enter", "io_uring_register",
    # peer/fds.py tells an eventfd a peer passed from another fd by its /proc link.
    "readlink", "readlinkat",
)
IO_POOL = (*PYTHON, "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
           "fsync", "fdatasync", "fallocate", "ioctl")
# The control API's thread once listening: its own asyncio loop, HTTP on accepted
# connections, lazy imports at a first request (prometheus_client at the first scrape:
# openat, getdents64), an executor thread for pause/resume/stop (clone, threads only).
API = (*PYTHON, "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2",
       "pipe2", "recvfrom", "recvmsg", "sendto", "sendmsg", "accept4", "shutdown",
       "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair", "ioctl",
       "openat", "getdents64", "readlink", "readlinkat", "sendfile")
# A backend process after set-up: the event loop's list plus its I/O threads' (it
# runs both in one process); it may also start threads (see STARTS_THREADS).
BACKEND = (*EVENT_LOOP, *IO_POOL)

KINDS: dict[str, tuple[str, ...]] = {
    "vcpu": VCPU, "event-loop": EVENT_LOOP, "io-pool": IO_POOL, "api": API,
    "backend": BACKEND,
}
UNIX_SOCKETS_ONLY = frozenset(("event-loop", "api", "backend"))
STARTS_THREADS = frozenset(("backend", "api"))

_log = OnceLog()
_state = threading.local()
applied: dict[str, int] = {}  # kind -> threads filtered (for reports and tests)
_libc: Any = None
_pyseccomp: Any = None


def prepare(mode: SeccompMode | str) -> None:
    """Import the binding on the calling (unfiltered) thread, before any thread that
    will filter itself starts: its import runs ldconfig to find the library."""
    if SeccompMode(mode) is not SeccompMode.OFF and not available():
        _log.warn("absent", "seccomp: libseccomp not available; threads run unfiltered")


def available() -> bool:
    """libseccomp and its binding are importable here."""
    try:
        _binding()
    except (ImportError, OSError):
        return False
    return True


def _binding() -> Any:
    global _pyseccomp
    if _pyseccomp is None:
        # pyseccomp finds libc and libseccomp with ctypes.util.find_library, which runs
        # ldconfig (and maybe gcc) in a subprocess: 6-13 ms measured here, more than the
        # rest of the import. The sonames are fixed by the libraries' ABI, so it is
        # handed them for the import (on the main thread, before any other starts);
        # an absent libseccomp.so.2 still fails as ImportError/OSError.
        import ctypes.util

        real = ctypes.util.find_library
        sonames = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
        ctypes.util.find_library = lambda name: sonames.get(name) or real(name)
        try:
            import pyseccomp  # type: ignore[import-untyped]  # lazy: only runs that filter
        finally:
            ctypes.util.find_library = real
        _pyseccomp = pyseccomp
    return _pyseccomp


def name_thread(name: str) -> None:
    """Set the calling thread's kernel name (``top -H``, ``/proc/PID/task/*/comm``,
    strace's per-thread files show it): Python 3.11 leaves every thread "python3"."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15  # <linux/prctl.h> PR_SET_NAME; 16 bytes with the NUL
        _libc.prctl(pr_set_name, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # naming is cosmetic


def apply(kind: str, mode: SeccompMode | str, *, extra: tuple[str, ...] = ()) -> bool:
    """Filter the calling thread (and threads it starts later) with ``kind``'s list.
    True if a filter was loaded; False for ``off`` or where libseccomp is absent (said
    once). A thread is filtered at most once."""
    mode = SeccompMode(mode)
    if mode is SeccompMode.OFF or getattr(_state, "kind", None) is not None:
        return False
    try:
        sc = _binding()
    except (ImportError, OSError) as e:
        _log.warn("absent", f"seccomp: libseccomp not available ({e}); threads run "
                  "unfiltered")
        return False
    default = sc.ERRNO(errno.EPERM) if mode is SeccompMode.ENFORCE else sc.LOG
    f = sc.SyscallFilter(defaction=default)
    for name in dict.fromkeys((*KINDS[kind], *extra)):
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            f.add_rule(sc.ALLOW, name)  # (fails for a call this kernel/arch lacks)
    if kind in UNIX_SOCKETS_ONLY:
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, socket.AF_UNIX))
    if kind in STARTS_THREADS:
        # Threads, not processes: clone only with CLONE_THREAD. clone3 takes its flags
        # in a struct a filter cannot read, so it answers ENOSYS, on which glibc's
        # pthread_create falls back to clone (as systemd and Chromium filter it).
        clone_thread = 0x00010000  # <linux/sched.h> CLONE_THREAD
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, clone_thread, clone_thread))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.load()
    _state.kind = kind
    applied[kind] = applied.get(kind, 0) + 1
    return True
