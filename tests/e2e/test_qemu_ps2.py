"""The ps2 tiny guest of tests/kvm/test_ps2.py against QEMU's i8042 and PS/2 devices
(q35, TCG): the same init sequence passes, and input injected through QMP's
input-send-event comes out of the guest as the same bytes pyvmm's devices give for
the same input through the library API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyvmm.machine.vm import Machine
from tests.kvm.test_ps2 import INIT_STEPS, KBD_SET1, echoed, run_with_input

pytestmark = pytest.mark.qemu

# Small movements only: QEMU's mouse splits a movement into packets of at most ±127
# and never sets the overflow bits (docs/devices/i8042.md), so those are not compared.
MOVES = [(10, -5, 1, 1), (-3, 7, 0, 0)]  # (dx, dy up, wheel, buttons)


def pyvmm_input(m: Machine) -> None:
    assert m.keyboard.type_text("Hi") == 2
    assert m.keyboard.press("KEY_UP") and m.keyboard.release("KEY_UP")
    for dx, dy, dz, b in MOVES:
        assert m.mouse.move(dx, dy, dz=dz, buttons=b)


def key(q: str, down: bool) -> dict[str, Any]:
    return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": q}}}


def qemu_events() -> list[list[dict[str, Any]]]:
    """The same input as QMP event batches (each batch ends in one sync)."""
    keys = [("shift", True), ("h", True), ("h", False), ("shift", False), ("i", True),
            ("i", False), ("up", True), ("up", False)]
    batches = [[key(q, d)] for q, d in keys]
    held = False
    wheel_up: list[dict[str, Any]] = []
    for dx, dy, dz, b in MOVES:
        # QEMU counts the wheel as a button: its release alone would be a packet of its
        # own, so it goes with the next movement.
        ev, wheel_up = wheel_up, []
        if bool(b & 1) != held:
            held = bool(b & 1)
            ev.append({"type": "btn", "data": {"down": held, "button": "left"}})
        ev.append({"type": "rel", "data": {"axis": "x", "value": dx}})
        ev.append({"type": "rel", "data": {"axis": "y", "value": -dy}})  # screen y is down
        if dz:  # wheel byte +1: Linux's REL_WHEEL -1, QEMU's wheel-down
            ev.append({"type": "btn", "data": {"down": True, "button": "wheel-down"}})
            wheel_up = [{"type": "btn", "data": {"down": False, "button": "wheel-down"}}]
        batches.append(ev)
    assert not wheel_up, "the last movement must not turn the wheel"
    return batches


class Qmp:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.s.connect(str(path))
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while True:
            msg: dict[str, Any] = json.loads(self.f.readline())
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        r = self._recv()
        assert "return" in r, r
        return r


@pytest.mark.parametrize("irq", [0, 1, 2], ids=["polled", "ioapic", "pic"])
def test_ps2_guest_against_qemus_i8042(guests: Path, tmp_path: Path, irq: int) -> None:
    exe = shutil.which("qemu-system-x86_64")
    assert exe, "the qemu marker needs qemu-system-x86_64"
    n_kbd, n_aux = len(KBD_SET1), 4 * len(MOVES)
    # The same input through pyvmm's library API first: the reference output.
    r, ours, _ = run_with_input(guests, "kernel", f"xlate=1 irq={irq} bytes={n_kbd + n_aux}",
                                pyvmm_input)
    assert (r.reason, r.exit_code) == ("reset", 0), ours[-2000:]
    qmp_path = tmp_path / "qmp.sock"
    p = subprocess.Popen(
        [exe, "-accel", "tcg", "-M", "q35", "-m", "64", "-nodefaults", "-nographic",
         "-serial", "stdio", "-monitor", "none", "-no-reboot",
         "-qmp", f"unix:{qmp_path},server=on,wait=off",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(guests / "ps2.elf"),
         "-append", f"xlate=1 irq={irq} bytes={n_kbd + n_aux}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    out = bytearray()
    ready = threading.Event()

    def reader() -> None:
        assert p.stdout is not None
        while chunk := p.stdout.read1(4096):  # type: ignore[attr-defined]
            out.extend(chunk)
            if b"ps2 ready\n" in out or b"FAIL" in out:
                ready.set()
        ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        qmp = Qmp(qmp_path)
        assert ready.wait(120), bytes(out[-2000:])
        assert b"ps2 ready\n" in out, bytes(out[-2000:])
        for batch in qemu_events():
            try:
                qmp.cmd("input-send-event", events=batch)
            except OSError:  # QEMU ended: the guest had all its bytes (compared below)
                break
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    t.join(10)
    theirs = out.decode(errors="replace")
    assert rc == 0, theirs[-2000:]
    for step in INIT_STEPS:
        assert f"ps2 {step} ok\n" in theirs, theirs[-2000:]
    assert echoed(theirs) == echoed(ours), (theirs[-1500:], ours[-1500:])
    assert echoed(ours)[0] == KBD_SET1
