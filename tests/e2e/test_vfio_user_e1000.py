"""Linux's e1000 driver, bound to pyvmm's e1000 (82540EM) exported over vfio-user, pings
and sends TCP to a peer on our side. The function has no MSI: every interrupt is INTx,
carried by the vfio-user INTx eventfd (trigger, then QEMU's EOI/unmask on BAR access);
the driver reads the MAC from the EEPROM by EECD bit-banging. Everything stays on this
machine: the TAP, its 192.0.2.1 (TEST-NET-1) address and the TCP sink live in a network
namespace this test creates and deletes; the backend runs inside it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework import kit

pytestmark = pytest.mark.qemu

# Not the model's default MAC: the guest's MAC comes from the EEPROM the driver bit-bangs.
MAC = "52:54:00:e1:00:0a"

SINK = """
import hashlib, socket, sys
s = socket.socket(); s.bind(("192.0.2.1", 5555)); s.listen(1); s.settimeout(200)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

SCRIPT = """
echo "DRIVER=$(basename $(readlink /sys/class/net/eth0/device/driver))"
echo "MAC=$(cat /sys/class/net/eth0/address)"
ip link set lo up
ip link set eth0 up || exit 10
ip addr add 192.0.2.2/24 dev eth0
# The driver reports carrier from its watchdog (link-up interrupt, then STATUS.LU).
i=0; while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do
  i=$((i+1)); [ $i -gt 300 ] && { dmesg | tail -20; exit 12; }; sleep 0.1; done
ping -c 3 -W 5 192.0.2.1 | sed 's/^/PING /'
dd if=/dev/urandom of=/tmp/d bs=64k count=16 2>/dev/null
echo "SHA=$(sha256sum /tmp/d | cut -d' ' -f1)"
nc 192.0.2.1 5555 < /tmp/d || exit 11
grep eth0 /proc/interrupts | sed 's/^/IRQ /'
"""


def test_linux_e1000_over_vfio_user_ping_and_tcp(tmp_path: Path) -> None:
    for tool in ("debootstrap", "unshare", "ip"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    from tests.framework.sid import qemu_in_sid, vfio_user_linux_args

    ns = f"pvmne{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs: list[subprocess.Popen[bytes]] = []
    log = open(tmp_path / "backend.log", "wb")  # noqa: SIM115 - closed after the backend
    try:
        nsx = ["ip", "netns", "exec", ns]
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "tuntap", "add", "dev", "pvt0", "mode", "tap"],
                    ["ip", "addr", "add", "192.0.2.1/24", "dev", "pvt0"],
                    ["ip", "link", "set", "pvt0", "up"]):
            subprocess.run(nsx + cmd, check=True)
        sink = subprocess.Popen([*nsx, sys.executable, "-c", SINK], stdout=subprocess.PIPE)
        procs.append(sink)
        sock = tmp_path / "vfu.sock"
        backend = [sys.executable, "-m", "pyvmm", "backend", "vfio-user", "--device",
                   f"e1000,tap=pvt0,mac={MAC}", "--socket", str(sock)]
        procs.append(subprocess.Popen([*nsx, *backend], stderr=log))
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        k = kit.build()
        shutil.copy(k.vmlinux, tmp_path / "vmlinux")
        (tmp_path / "initrd.cpio").write_bytes(kit.initramfs(k, SCRIPT))
        r = qemu_in_sid(tmp_path, vfio_user_linux_args(), timeout=240)
        out = r.stdout.decode(errors="replace")
        sink_out, _ = sink.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        log.close()
    blog = (tmp_path / "backend.log").read_text(errors="replace")
    assert "TCG-TEST-RC=0" in out, out[-2000:] + blog[-1500:]
    assert "DRIVER=e1000" in out, out[-2000:]
    assert f"MAC={MAC}" in out, out[-2000:]
    # Every interrupt of this function is INTx (the 82540EM has no MSI): the driver's
    # line counted some, through the vfio-user INTx eventfd and QEMU's IO-APIC pin.
    irq = re.search(r"IRQ\s+\d+:\s+(\d+)\s+IO-APIC\s+\S+\s+eth0", out)
    assert irq and int(irq.group(1)) > 0, out[-1500:]
    assert re.search(r"3 packets transmitted, 3 packets received", out), out[-1500:]
    sha = re.search(r"SHA=([0-9a-f]{64})", out)
    n, digest = sink_out.decode().split()
    assert sha and digest == sha.group(1) and int(n) == 16 * 65536
    assert hashlib.sha256(b"").hexdigest() != digest
