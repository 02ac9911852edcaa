"""Issue #18 item 4: per-thread seccomp allow-lists. A device's code on the vCPU thread
and on the event loop tries calls its thread kind may not make; under ``enforce`` they
fail with EPERM while the guest's own work completes, under ``off`` the same calls go
through. A backend process is filtered once set up. The kernel's view
(/proc/PID/task/TID/status "Seccomp:") is checked, not pyvmm's own word."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm import sandbox
from pyvmm.devices.spec import DeviceConfig, DeviceSpec, HostContext, IsaRange, Kind
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine
from pyvmm.registry import DEVICES
from tests.conftest import pyvmm_cmd

pytestmark = pytest.mark.skipif(not sandbox.available(),
                                reason="libseccomp or its binding (pyseccomp) is absent")


def attempt(fn: object) -> str:
    try:
        r = fn()  # type: ignore[operator]
    except PermissionError:
        return "EPERM"
    except OSError as e:
        return f"errno {e.errno}"
    if isinstance(r, socket.socket):
        r.close()
    elif isinstance(r, int) and r > 0:  # a spawned pid
        os.waitpid(r, 0)
    elif hasattr(r, "close"):
        r.close()
    return "ok"


def trials() -> dict[str, object]:
    return {
        "open": lambda: open("/proc/self/status", "rb"),
        "inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        "unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
        "spawn": lambda: os.posix_spawn("/bin/true", ["true"], {}),
    }


@dataclass(kw_only=True)
class ProberConfig(DeviceConfig):
    pass


class Prober:
    """At 0x510: a guest write runs the trials on the vCPU thread (the exit's handler)
    and queues them for the event loop; reads return what was written."""

    def __init__(self, ctx: HostContext) -> None:
        self.events = ctx.events
        self.value = 7
        self.results: dict[str, dict[str, str]] = {}

    def read(self, base: int, offset: int, size: int) -> int:
        return self.value

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        self.value = value
        if "vcpu" not in self.results:
            self.results["vcpu"] = {k: attempt(f) for k, f in trials().items()}
            self.events.call_soon(self._in_loop)

    def _in_loop(self) -> None:
        self.results["event-loop"] = {k: attempt(f) for k, f in trials().items()}


PROBERS: list[Prober] = []


def make(cfg: ProberConfig, ctx: HostContext) -> Prober:
    PROBERS.append(Prober(ctx))
    return PROBERS[-1]


REGISTRY = (*DEVICES, DeviceSpec("test-prober", ProberConfig, Kind.ISA, make,
                                 "runs forbidden calls", isa=(IsaRange("pio", 0x510, 4),)))


def run(guests: Path, tmp_path: Path, mode: str) -> tuple[dict[str, dict[str, str]], str]:
    out = tmp_path / "serial.txt"
    PROBERS.clear()
    cfg = MachineConfig.from_dict({
        "kernel": str(guests / "probe.elf"), "cmdline": "port=0x510", "quiet": True,
        "serial": f"file:{out}", "seccomp": mode, "timeout": 60,
        "devices": [{"type": "test-prober"}]}, registry=REGISTRY)
    with Machine(cfg) as m:
        r = m.run()
        assert (r.reason, r.exit_code) == ("reset", 0), r.message
    return PROBERS[0].results, out.read_text()


def test_enforce_refuses_what_a_thread_kind_may_not_do_and_the_guest_goes_on(
        guests: Path, tmp_path: Path) -> None:
    results, text = run(guests, tmp_path, "enforce")
    # The guest's probe completed: its write reached the device and read back.
    assert "probe port 0x510: before=0x7 after=0x5a5a0510" in text
    assert results["vcpu"] == {"open": "EPERM", "inet": "EPERM", "unix": "EPERM",
                               "spawn": "EPERM"}
    # The event loop may open files (a serial file end) and AF_UNIX sockets (vhost-user
    # reconnects), never other sockets or processes.
    assert results["event-loop"] == {"open": "ok", "inet": "EPERM", "unix": "ok",
                                     "spawn": "EPERM"}
    # The calling thread is never filtered: it still can after run().
    assert attempt(trials()["inet"]) == "ok"


def test_off_lets_the_same_calls_through(guests: Path, tmp_path: Path) -> None:
    results, _ = run(guests, tmp_path, "off")
    assert results["vcpu"] == {k: "ok" for k in trials()}
    assert results["event-loop"] == {k: "ok" for k in trials()}


def seccomp_of(pid: int) -> dict[str, int]:
    """Thread name -> the kernel's Seccomp mode (0 none, 2 filter) for each thread."""
    modes = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue
        mode = next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("Seccomp:"))
        modes[comm] = max(mode, modes.get(comm, 0))
    return modes


def test_a_running_vmm_s_threads_are_filtered_and_its_main_thread_is_not(
        guests: Path, tmp_path: Path) -> None:
    p = subprocess.Popen(pyvmm_cmd("run", "-q", "--kernel", str(guests / "spin.elf"),
                                   "--timeout", "120", "--serial", "none",
                                   "--api-socket", str(tmp_path / "api.sock")),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        modes: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until both threads have filtered themselves
            modes = seccomp_of(p.pid)
            if modes.get("vcpu0") == modes.get("event-loop") == modes.get("api") == 2:
                break
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            time.sleep(0.1)
        assert modes.get("vcpu0") == modes.get("event-loop") == modes.get("api") == 2, modes
        main = Path(f"/proc/{p.pid}/status").read_text()
        assert "Seccomp:\t0" in main  # the main thread builds, waits and reports
    finally:
        p.terminate()
        p.wait(timeout=30)
    assert p.returncode == 143  # SIGTERM: a clean stop, as before


def test_a_backend_process_is_filtered_once_set_up(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    p = subprocess.Popen(pyvmm_cmd("backend", "vhost-user-blk", "--socket", str(sock),
                                   "--disk", str(img)), stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        assert b"serving" in p.stderr.readline()  # printed just before filtering
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Path(f"/proc/{p.pid}/status").read_text(
                ).find("Seccomp:\t2") < 0:
            time.sleep(0.05)
        assert "Seccomp:\t2" in Path(f"/proc/{p.pid}/status").read_text()
        # Still serving: a client connects and is answered (GET_FEATURES).
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(30)
        c.connect(str(sock))
        c.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(4))
        reply = c.recv(64)
        c.close()
        assert reply[:4] == (1).to_bytes(4, "little") and len(reply) == 20
    finally:
        p.terminate()
        p.wait(timeout=30)
    assert not sock.exists()  # removed on SIGTERM, under the filter
