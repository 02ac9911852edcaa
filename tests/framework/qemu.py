"""Run Linux (the e2e kit) under QEMU with software emulation and collect its verdict."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.framework import kit


@dataclass
class GuestRun:
    rc: int | None  # the test script's exit status, None if it never printed one
    output: str


def run_linux(tmp: Path, script: str, qemu_args: list[str], timeout: float = 180,
              mem_mb: int = 256) -> GuestRun:
    """Boot the kit with ``script`` as /test.sh; shared memfd RAM so vhost-user and
    vfio-user backends can map it."""
    exe = shutil.which("qemu-system-x86_64")
    assert exe, "qemu-system-x86_64 is not installed"
    k = kit.build()
    initrd = tmp / "initrd.cpio"
    initrd.write_bytes(kit.initramfs(k, script))
    cmd = [exe, "-accel", "tcg", "-M", "q35,memory-backend=mem", "-object",
           f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on", "-m", f"{mem_mb}M",
           "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
           "-kernel", str(k.vmlinux), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 quiet", *qemu_args]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout)
        out = p.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + "\n[timeout]"
    m = re.search(r"TCG-TEST-RC=(\d+)", out)
    return GuestRun(int(m.group(1)) if m else None, out)
