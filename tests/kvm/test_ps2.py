"""The PS/2 keyboard and mouse behind the i8042, driven by a tiny guest that runs the
init sequences of Linux's i8042/atkbd/psmouse and echoes what arrives over the UART,
while the host injects keys and mouse movements through the library API
(``Machine.keyboard`` / ``Machine.mouse``)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine, RunResult

INIT_STEPS = ["selftest", "kbd-port-test", "aux-port-test", "aux-loopback", "kbd-reset",
              "kbd-id", "kbd-set2", "kbd-leds", "kbd-typematic", "kbd-echo", "kbd-enable",
              "mouse-reset", "mouse-id", "mouse-knock", "mouse-id-imps", "mouse-resolution",
              "mouse-scaling", "mouse-rate", "mouse-status", "mouse-enable"]

# What the host injects, and what a PC's keyboard and IntelliMouse send for it.
# "Hi" = LeftShift down, H down, H up, LeftShift up, I down, I up; then cursor up.
KBD_SET1 = [0x2A, 0x23, 0xA3, 0xAA, 0x17, 0x97, 0xE0, 0x48, 0xE0, 0xC8]  # translated
KBD_SET2 = [0x12, 0x33, 0xF0, 0x33, 0xF0, 0x12, 0x43, 0xF0, 0x43,
            0xE0, 0x75, 0xE0, 0xF0, 0x75]
# move(10, -5, dz=1, left) and move(-300, 0): 4-byte packets (ID 3 after the knock),
# byte 0 = buttons | always-1 | X/Y sign | X/Y overflow.
AUX = [0x08 | 0x01 | 0x20, 10, 0xFB, 0x01,
       0x08 | 0x10 | 0x40, 0x00, 0x00, 0x00]


def inject(m: Machine) -> None:
    assert m.keyboard.type_text("Hi") == 2
    assert m.keyboard.press("KEY_UP") and m.keyboard.release("KEY_UP")
    assert m.mouse.move(10, -5, dz=1, buttons=1)
    assert m.mouse.move(-300, 0)


def run_with_input(guests: Path, chip: str, cmdline: str,
                   host: Callable[[Machine], None]) -> tuple[RunResult, str, Machine]:
    cfg = MachineConfig.from_dict({"kernel": str(guests / "ps2.elf"), "quiet": True,
                                   "cmdline": cmdline, "serial": "none", "timeout": 60,
                                   "irqchip": chip})
    out = bytearray()
    cond = threading.Condition()
    errors: list[BaseException] = []

    def capture(data: bytes) -> None:
        with cond:
            out.extend(data)
            cond.notify_all()

    with Machine(cfg) as m:
        m.serial.output = capture

        def driver() -> None:  # the host side: input while the guest runs
            with cond:
                cond.wait_for(lambda: b"ps2 ready\n" in out or b"FAIL" in out, 60)
                ready = b"ps2 ready\n" in out
            if ready:
                try:
                    host(m)
                except BaseException as e:  # reported by the test thread
                    errors.append(e)

        t = threading.Thread(target=driver, daemon=True)
        t.start()
        r = m.run()
        t.join(30)
    assert not errors, errors
    return r, out.decode(errors="replace"), m


def echoed(text: str) -> tuple[list[int], list[int]]:
    kbd = [int(b, 16) for b in re.findall(r"^ps2 kbd ([0-9a-f]{2})$", text, re.M)]
    aux = [int(b, 16) for b in re.findall(r"^ps2 aux ([0-9a-f]{2})$", text, re.M)]
    return kbd, aux


@pytest.mark.parametrize("chip", ["kernel", "split"])
@pytest.mark.parametrize("irq", [0, 1, 2], ids=["polled", "ioapic", "pic"])
def test_ps2_init_and_injected_input_round_trip(guests: Path, chip: str, irq: int) -> None:
    n = len(KBD_SET1) + len(AUX)
    r, text, m = run_with_input(guests, chip, f"xlate=1 irq={irq} bytes={n}", inject)
    assert (r.reason, r.exit_code) == ("reset", 0), text[-2000:]
    for step in INIT_STEPS:
        assert f"ps2 {step} ok\n" in text, text[-2000:]
    kbd, aux = echoed(text)
    assert kbd == KBD_SET1, text[-2000:]
    assert aux == AUX, text[-2000:]
    done = re.search(r"ps2 done irqs=(\d+)/(\d+)", text)
    assert done, text[-500:]
    if irq:  # one interrupt per byte on its own line, none on the other
        assert (int(done[1]), int(done[2])) == (len(KBD_SET1), len(AUX)), text[-500:]
    else:
        assert (int(done[1]), int(done[2])) == (0, 0)
    rep = m.exit_report()["i8042"]  # nothing dropped, no guest mistakes
    assert rep["kbd_host_dropped"] == rep["mouse_host_dropped"] == 0, rep
    assert rep["errors"] == {} and rep["resets"] == 1, rep


def test_ps2_untranslated_set_2(guests: Path) -> None:
    n = len(KBD_SET2) + len(AUX)
    r, text, _ = run_with_input(guests, "kernel", f"xlate=0 irq=1 bytes={n}", inject)
    assert (r.reason, r.exit_code) == ("reset", 0), text[-2000:]
    assert "ps2 kbd-id ok\n" in text  # 0xAB 0x83 untranslated
    kbd, aux = echoed(text)
    assert kbd == KBD_SET2 and aux == AUX, text[-2000:]


def test_keyboard_stdin_types_terminal_input(guests: Path) -> None:
    """``pyvmm run --keyboard stdin``: bytes on stdin become key presses (serial stdio
    is then output only); "Hi" and the terminal's cursor-up sequence."""
    import os
    import select
    import subprocess
    import time

    from tests.conftest import pyvmm_cmd

    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--kernel", str(guests / "ps2.elf"),
                                      "--keyboard", "stdin", "--timeout", "60",
                                      "--cmdline", f"irq=1 bytes={len(KBD_SET1)}"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        buf = b""
        deadline = time.monotonic() + 60
        while b"ps2 ready\n" not in buf and b"FAIL" not in buf and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1)
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
        assert b"ps2 ready\n" in buf, buf[-2000:]
        proc.stdin.write(b"Hi\x1b[A")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (buf + out).decode(errors="replace")
    assert proc.returncode == 0, text[-2000:] + err.decode(errors="replace")
    assert echoed(text) == (KBD_SET1, []), text[-2000:]


def test_ps2_guest_floods_and_bad_commands_are_answered_and_the_vm_goes_on(
        guests: Path) -> None:
    from pyvmm.devices.input.ps2 import QUEUE_SIZE
    from pyvmm.devices.legacy.i8042 import CTL_QUEUE_MAX

    n = len(KBD_SET1) + len(AUX)
    r, text, m = run_with_input(guests, "split", f"flood=1 irq=1 bytes={n}", inject)
    assert (r.reason, r.exit_code) == ("reset", 0), text[-2000:]
    # the output buffer plus the bounded queue; the rest dropped, logged once, counted
    assert f"ps2 flood echoes={QUEUE_SIZE + 1} other=0\n" in text, text[-2000:]
    assert f"ps2 flood selftests={CTL_QUEUE_MAX + 1}\n" in text, text[-2000:]
    assert "ps2 empty-read status=0 55 55\n" in text  # the last byte, again
    assert "ps2 kbd-unknown ok\n" in text  # answered 0xFE (resend)
    assert echoed(text) == (KBD_SET1, AUX)  # and input works as before
    rep = m.exit_report()["i8042"]
    assert rep["kbd_replies_dropped"] == 1000 - QUEUE_SIZE - 1, rep
    assert rep["ctl_dropped"] == 100 - CTL_QUEUE_MAX - 1, rep
    assert rep["errors"] == {"ps2-flood": 1000 - QUEUE_SIZE - 1,
                             "ctl-flood": 100 - CTL_QUEUE_MAX - 1, "kbd-cmd": 1}, rep
