"""Linux's own ``ata_piix`` binds to pyvmm's PIIX IDE function in native-PCI mode
(``native=on``: both channels in I/O BARs 0-3, one INTx pin), exported over vfio-user
from its own process (QEMU 11 vfio-user-pci, TCG). Compatibility mode cannot go this
way — its fixed ports and IRQs 14/15 are no PCI region or interrupt (docs/devices/ide.md);
native mode is what makes the function a PCI function only. Data checked on both sides,
interrupts by INTx."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

SCRIPT = """
i=0; while [ ! -b /dev/sda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/sda ] || { dmesg | grep -i -e ata -e scsi | tail -30; exit 10; }
ls /sys/bus/pci/drivers/ata_piix/ | grep '^0000:' | sed 's/^/BOUND /'
echo "XFER=$(cat /sys/class/ata_device/dev1.0/xfer_mode)"
echo "MODEL=$(cat /sys/block/sda/device/model)"
echo "SIZE=$(cat /sys/block/sda/size)"
dmesg | grep -i -e 'ata[0-9]' | sed 's/^/DMESG /'
dd if=/dev/sda of=/tmp/r bs=1M count=1 iflag=direct 2>/dev/null || exit 11
echo "RSHA=$(sha256sum /tmp/r | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
dd if=/tmp/p of=/dev/sda bs=64k seek=32 count=16 oflag=direct 2>/dev/null || exit 12
sync
echo "WSHA=$(sha256sum /tmp/p | cut -d' ' -f1)"
grep ata_piix /proc/interrupts | sed 's/^/IRQ /'
"""


def test_linux_ata_piix_native_mode_over_vfio_user(tmp_path: Path) -> None:
    from tests.framework.sid import linux_with_vfio_user, prepare_guest

    prepare_guest(tmp_path, {"initrd": SCRIPT})
    img = tmp_path / "d.img"
    head = hashlib.sha256(b"pyvmm ide").digest() * (1 << 15)  # 1 MiB the guest reads
    img.write_bytes(head + bytes(7 << 20))
    r, err = linux_with_vfio_user(tmp_path, ["--device", f"ide,path={img},native=on"])
    out = r.stdout.decode(errors="replace")
    assert "TCG-TEST-RC=0" in out, (out[-3000:] + r.stderr.decode(errors="replace")[-800:]
                                    + err.decode(errors="replace")[-800:])
    assert re.search(r"BOUND 0000:", out), out[-2000:]  # ata_piix bound the function
    # libata chose bus-master DMA (the PIIX3's best: MWDMA2), so the data moved by PRDs
    # through the client's DMA_MAPs, not by PIO.
    assert "XFER=XFER_MW_DMA_2" in out, out[-2000:]
    assert "MODEL=PYVMM HARDDISK" in out and f"SIZE={(8 << 20) // 512}" in out
    rsha = re.search(r"RSHA=([0-9a-f]{64})", out)
    assert rsha and rsha.group(1) == hashlib.sha256(head).hexdigest()
    wsha = re.search(r"WSHA=([0-9a-f]{64})", out)
    data = img.read_bytes()
    assert wsha and hashlib.sha256(data[2 << 20:3 << 20]).hexdigest() == wsha.group(1)
    assert data[:1 << 20] == head  # nothing else written
    irq = re.search(r"IRQ\s+\d+:\s+(\d+)\s+IO-APIC\s+\S+\s+ata_piix", out)
    assert irq and int(irq.group(1)) > 0, out[-2000:]  # INTx, shared by both channels
