"""Linux's own nvme driver binds to pyvmm's emulated NVMe controller, exported over
vfio-user from its own process (QEMU 11 vfio-user-pci, software emulation): the full
emulation mode reached by an unmodified driver. Data checked on both sides; the
controller's identity as Linux read it; completions by MSI-X."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

SCRIPT = """
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/nvme0n1 ] || { dmesg | grep -i nvme; exit 10; }
echo "MODEL=$(cat /sys/class/nvme/nvme0/model)"
echo "SERIAL=$(cat /sys/class/nvme/nvme0/serial)"
echo "SIZE=$(cat /sys/block/nvme0n1/size)"
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
dd if=/tmp/p of=/dev/nvme0n1 bs=1M count=4 oflag=direct 2>/dev/null || exit 12
sync
dd if=/dev/nvme0n1 of=/tmp/q bs=1M count=4 iflag=direct 2>/dev/null || exit 13
cmp /tmp/p /tmp/q || exit 14
echo "SHA=$(sha256sum /tmp/p | cut -d' ' -f1)"
grep nvme /proc/interrupts | sed 's/^/IRQ /'
"""


def test_linux_nvme_driver_over_vfio_user(tmp_path: Path) -> None:
    from tests.framework.sid import linux_with_vfio_user, prepare_guest

    prepare_guest(tmp_path, {"initrd": SCRIPT})
    img = tmp_path / "n.img"
    img.write_bytes(bytes(16 << 20))
    r, err = linux_with_vfio_user(tmp_path, ["--device", "nvme,serial=pyvmm-vfu-nvme",
                                             "--disk", str(img)])
    out = r.stdout.decode(errors="replace")
    assert "TCG-TEST-RC=0" in out, (out[-2500:] + r.stderr.decode(errors="replace")[-800:]
                                    + err.decode(errors="replace")[-800:])
    assert "MODEL=pyvmm NVMe" in out and "SERIAL=pyvmm-vfu-nvme" in out
    assert f"SIZE={(16 << 20) // 512}" in out
    sha = re.search(r"SHA=([0-9a-f]{64})", out)
    assert sha and hashlib.sha256(img.read_bytes()[:4 << 20]).hexdigest() == sha.group(1)
    irqs = [int(n) for n in re.findall(r"IRQ\s+\d+:\s+(\d+)\s+PCI-MSIX?", out)]
    assert irqs and sum(irqs) > 0  # completions came by MSI-X
