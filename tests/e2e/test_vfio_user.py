"""Linux's own virtio_pci and virtio_blk drivers bind to pyvmm's virtio-blk PCI function
exported over vfio-user from its own process (QEMU 11 vfio-user-pci, software
emulation): data checked on both sides, interrupts delivered by MSI-X eventfds."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

SCRIPT = """
cat /sys/bus/pci/devices/*/vendor | grep -q 0x1af4 || exit 10
ls /sys/block | grep -q vda || exit 11
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M count=4 oflag=direct 2>/dev/null || exit 12
sync
dd if=/dev/vda of=/tmp/q bs=1M count=4 iflag=direct 2>/dev/null || exit 13
cmp /tmp/p /tmp/q || exit 14
echo "SHA=$(sha256sum /tmp/p | cut -d' ' -f1)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
grep virtio0-req /proc/interrupts | sed 's/^/IRQ /'
"""


def test_linux_virtio_blk_over_vfio_user(tmp_path: Path) -> None:
    from tests.framework.sid import linux_with_vfio_user, prepare_guest

    prepare_guest(tmp_path, {"initrd": SCRIPT})
    img, sock = tmp_path / "d.img", tmp_path / "vfu.sock"
    img.write_bytes(bytes(16 << 20))
    r, _ = linux_with_vfio_user(tmp_path, ["--device", "virtio-blk,serial=pyvmm-vfu",
                                           "--disk", str(img)])
    out = r.stdout.decode(errors="replace")
    assert "TCG-TEST-RC=0" in out, out[-1500:] + r.stderr.decode(errors="replace")[-800:]
    sha = re.search(r"SHA=([0-9a-f]{64})", out)
    assert sha and hashlib.sha256(img.read_bytes()[:4 << 20]).hexdigest() == sha.group(1)
    assert "SERIAL=pyvmm-vfu" in out
    irq = re.search(r"IRQ\s+\d+:\s+(\d+)\s+PCI-MSI", out)
    assert irq and int(irq.group(1)) > 0  # completions came by MSI-X
    assert not sock.exists()
