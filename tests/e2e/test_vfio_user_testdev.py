"""pyvmm's PCI test device exported over vfio-user, driven from a Linux guest by a shell
script with no driver at all: BARs through /dev/mem, config space through sysfs, a
DMA copy between two pages the guest reserved (memmap=), and the completion
interrupt by MSI-X, then one by MSI; and BAR4, shared memory the server offers as an
mmap'able region,
written by the guest without one message. The MSI-X table is programmed by hand, so the
interrupt lands on
a vector Linux has no handler for, which Linux itself reports in dmesg — proof that
the device's MSI-X trigger went through the client's eventfd into the guest's LAPIC.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for_path

pytestmark = pytest.mark.qemu

SRC, DST, VECTOR = 0x8000000, 0x8001000, 0xDF  # memmap=64K$SRC reserves both pages
MSI_VECTOR = 0xDE
SCRIPT = r"""
dev=
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x5050 ] && dev=$d
done
[ -n "$dev" ] || exit 10
echo "DEV=$dev"
cfg() { dd if=$dev/config bs=1 skip=$(($1)) count=$2 2>/dev/null | od -An -tu$2 | tr -d ' '; }
put16() { printf "\\$(printf %o $(($2 & 255)))\\$(printf %o $(($2 >> 8)))" |
          dd of=$dev/config bs=1 seek=$(($1)) conv=notrunc 2>/dev/null; }
echo 1 > $dev/enable || exit 11
put16 4 $(( $(cfg 4 2) | 4 ))                     # PCI_COMMAND |= bus master
bar0=$(sed -n 1p $dev/resource | cut -d' ' -f1)
bar1=$(sed -n 2p $dev/resource | cut -d' ' -f1)
[ "$(devmem $bar0 32)" = 0x5050ED01 ] || exit 12
# MSI-X entry 0 -> LAPIC 0, vector VECTOR, unmasked; then enable MSI-X
devmem $(($bar1)) 32 0xFEE00000; devmem $(($bar1 + 4)) 32 0
devmem $(($bar1 + 8)) 32 VECTOR;  devmem $(($bar1 + 12)) 32 0
p=$(cfg 0x34 1)
while [ "$p" != 0 ] && [ "$(cfg $p 1)" != 17 ]; do p=$(cfg $((p + 1)) 1); done
[ "$p" != 0 ] || exit 13
put16 $((p + 2)) $(( $(cfg $((p + 2)) 2) | 0x8000 ))
# DMA: 4 KiB of random bytes from SRC to DST, interrupt on completion
dd if=/dev/urandom of=/tmp/src bs=4096 count=1 2>/dev/null
dd if=/tmp/src of=/dev/mem bs=4096 seek=$((SRC / 4096)) conv=notrunc 2>/dev/null || exit 14
devmem $(($bar0 + 0x40)) 32 SRC; devmem $(($bar0 + 0x44)) 32 0
devmem $(($bar0 + 0x48)) 32 DST; devmem $(($bar0 + 0x4c)) 32 0
devmem $(($bar0 + 0x50)) 32 4096
devmem $(($bar0 + 0x58)) 32 5
sleep 1
echo "STATUS=$(devmem $(($bar0 + 0x20)) 32)"
echo "DMASUM=$(($(devmem $(($bar0 + 0x5c)) 32)))"
echo "SUM=$(od -An -tu1 -v /tmp/src | awk '{for (i = 1; i <= NF; i++) s += $i} END {print s}')"
dd if=/dev/mem of=/tmp/dst bs=4096 skip=$((DST / 4096)) count=1 2>/dev/null || exit 15
cmp /tmp/src /tmp/dst && echo DMA-COPY-OK
dmesg | grep "No irq handler for vector" | sed 's/^/IRQLOG /'
# BAR4 is shared memory the client mapped into the guest: eight words written there
# (byte sum 4 * (1 + ... + 8) = 144) must show in the device's SHM_SUM, while the device
# counts no trapped BAR4 access.
bar4=$(sed -n 5p $dev/resource | cut -d' ' -f1)
k=1
while [ $k -le 8 ]; do devmem $(($bar4 + 4 * k)) 32 $((0x01010101 * k)); k=$((k + 1)); done
echo "SHMSUM=$(($(devmem $(($bar0 + 0x60)) 32)))"
echo "SHMTRAPS=$(($(devmem $(($bar0 + 0x68)) 32)))"
# MSI instead of MSI-X: MSI-X off, the MSI capability -> LAPIC 0, vector MSIVEC, enabled;
# QEMU sees the enable, hands the server an eventfd for MSI, and RAISE interrupts by it.
put16 $((p + 2)) $(( $(cfg $((p + 2)) 2) & 0x7fff ))
m=$(cfg 0x34 1)
while [ "$m" != 0 ] && [ "$(cfg $m 1)" != 5 ]; do m=$(cfg $((m + 1)) 1); done
[ "$m" != 0 ] || exit 17
put16 $((m + 4)) 0; put16 $((m + 6)) 0xFEE0; put16 $((m + 8)) 0; put16 $((m + 10)) 0
put16 $((m + 12)) MSIVEC
put16 $((m + 2)) $(( $(cfg $((m + 2)) 2) | 1 ))
devmem $(($bar0 + 0x24)) 32 1
sleep 1
dmesg | grep "No irq handler for vector" | sed 's/^/IRQLOG2 /'
""".replace("MSIVEC", str(MSI_VECTOR)).replace("VECTOR", str(VECTOR)).replace(
    "DST", str(DST)).replace("SRC", str(SRC))


def test_testdev_dma_and_msix_from_a_guest_script(tmp_path: Path) -> None:
    from tests.framework.sid import prepare_guest, qemu_in_sid, vfio_user_linux_args

    prepare_guest(tmp_path, {"initrd": SCRIPT})
    sock = tmp_path / "vfu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "vfio-user", "--device",
                             "pci-testdev", "--socket", str(sock)], stderr=subprocess.PIPE)
    try:
        assert wait_for_path(sock)
        r = qemu_in_sid(tmp_path, vfio_user_linux_args(
            append=f"iomem=relaxed memmap=64K${SRC:#x}"), timeout=240)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    out = r.stdout.decode(errors="replace")
    assert "TCG-TEST-RC=0" in out, out[-1500:] + r.stderr.decode(errors="replace")[-800:]
    status = re.search(r"STATUS=(0x[0-9A-Fa-f]+)", out)
    assert status and int(status.group(1), 16) & 0x100  # DMA_DONE, not DMA_ERROR
    dmasum, hostsum = re.search(r"DMASUM=(\d+)", out), re.search(r"\bSUM=(\d+)", out)
    assert dmasum and hostsum and int(dmasum.group(1)) == int(hostsum.group(1))
    assert "DMA-COPY-OK" in out  # the device wrote DST in guest RAM through DMA_MAP's fd
    assert re.search(rf"IRQLOG .*\.{VECTOR} No irq handler for vector", out), out[-1500:]
    shm = re.search(r"SHMSUM=(\d+)", out)
    assert shm and int(shm.group(1)) == 144  # the device saw the guest's writes
    assert "SHMTRAPS=0" in out  # and none of them came as a message: BAR4 is mmapped
    assert re.search(rf"IRQLOG2 .*\.{MSI_VECTOR} No irq handler for vector", out), out[-1500:]
    assert b"Traceback" not in err
