"""Security issue #17 on a real vCPU: a stop ends the VM even when the vCPU thread is
stuck in device code (item 5's consequence: a guest-found loop on the vCPU thread made
neither --timeout nor Ctrl-C end the VMM)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pyvmm.machine import vm as vm_module
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine


def test_guest_5_a_vcpu_stuck_in_device_code_does_not_keep_the_vm_from_stopping(
        guests: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_module, "VCPU_STOP_GRACE_S", 0.5)
    cfg = MachineConfig.from_dict({"kernel": str(guests / "mmio_loop.elf"), "quiet": True,
                                   "cmdline": "iters=1000", "serial": "none", "timeout": 1})
    release, entered = threading.Event(), threading.Event()
    with Machine(cfg) as m:
        def stuck(base: int, offset: int, size: int, value: int) -> None:
            entered.set()
            release.wait()  # a device handler that never returns by itself

        m.testdev.write = stuck  # type: ignore[method-assign]
        try:
            r = m.run()  # looped in kick/join forever before
            assert entered.is_set()
            assert (r.reason, r.exit_code) == ("timeout", 124)
            assert m.vcpu_stuck and "abandoned" in r.message
            assert m.exit_report()["vcpu_stuck"] is True
        finally:
            release.set()
            assert m.vcpu_thread is not None
            m.vcpu_thread.join(30)  # it sees the stop once the handler returns
        assert not m.vcpu_thread.is_alive()
    # leaving the with-block closed the machine normally, the thread being gone
