"""What ``pyvmm compare`` runs: one row per device class, mode and VMM.

A row names the tiny guest (guests/src), its benchmark arguments and the pyvmm (or
QEMU) options that give it its device. Rows of one class run the same workload: disks
4 KiB random reads at QD1, NICs a 64-byte ping-pong through a TAP with a host echo,
consoles 64-byte lines out.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSES = ("disk", "nic", "console")

# The mode names of the issue: where the device is and how the guest reaches it.
FULL = "full emulation"
PARA = "paravirtual"
OUT = "paravirtual, out of process"
ASSIGNED = "assigned"


@dataclass(frozen=True)
class Row:
    name: str           # what --only takes
    cls: str            # disk, nic, console
    vmm: str            # pyvmm or QEMU
    mode: str           # FULL, PARA, OUT, ASSIGNED
    device: str         # what the guest drives
    transport: str      # how it reaches it
    guest: str          # guests/out/<guest>
    workload: str       # "blkload", "nvme", "ide-dma", "ide-pio", "nic", "console"
    disk: str = ""      # pyvmm --disk text ({img}, {sock}) or "" for none
    device_arg: str = ""  # pyvmm --device text
    backend: str = ""   # "vhost-user-blk" or "vfio-nvme": a pyvmm backend to start
    net: str = ""       # pyvmm --net suffix after tap=
    count_virtio: bool = True  # the virtio counters are this row's (not a bystander's)
    console: str = ""   # pyvmm --console text ({work}: the run's scratch directory)
    cmdline: str = ""   # extra guest arguments
    qemu_dev: tuple[str, ...] = ()  # QEMU's device arguments ({img}, {tap})
    machine: str = "q35"  # QEMU's machine type
    reason: str = ""    # set: the row cannot run (printed instead of numbers)


ROWS: tuple[Row, ...] = (
    Row("virtio-blk-pci", "disk", "pyvmm", PARA, "virtio-blk", "virtio-pci (ioeventfd)",
        "blkload.elf", "blkload", disk="path={img}"),
    Row("virtio-blk-mmio", "disk", "pyvmm", PARA, "virtio-blk", "virtio-mmio (ioeventfd)",
        "blkload.elf", "blkload", disk="path={img},transport=mmio", cmdline="mmio=1"),
    Row("vhost-user-blk", "disk", "pyvmm", OUT, "virtio-blk",
        "virtio-pci, vhost-user (pyvmm backend)", "blkload.elf", "blkload",
        disk="if=vhost-user,socket={sock}", backend="vhost-user-blk"),
    Row("nvme", "disk", "pyvmm", FULL, "NVMe", "PCI BAR doorbells, MSI-X", "nvme.elf", "nvme",
        disk="path={img},if=nvme"),
    Row("nvme-vfio-user", "disk", "pyvmm", ASSIGNED, "NVMe",
        "vfio-user client (pyvmm backend vfio-user)", "nvme.elf", "nvme",
        device_arg="vfio-user,socket={sock}", backend="vfio-nvme", cmdline="spin=20000000000"),
    Row("ide-dma", "disk", "pyvmm", FULL, "IDE/ATA", "ports, bus-master DMA", "ide.elf",
        "ide-dma", disk="path={img},if=ide", cmdline="bench_mode=1"),
    Row("ide-pio", "disk", "pyvmm", FULL, "IDE/ATA", "ports, PIO", "ide.elf", "ide-pio",
        disk="path={img},if=ide", cmdline="bench_mode=0"),
    Row("e1000", "nic", "pyvmm", FULL, "e1000 (82540EM)", "PCI BAR registers, TAP",
        "e1000.elf", "nic", net=",model=e1000"),
    Row("virtio-net", "nic", "pyvmm", PARA, "virtio-net", "virtio-pci (ioeventfd), TAP",
        "virtio_net.elf", "nic"),
    # The same guest and machine (a virtio-console present) for both console rows.
    Row("uart", "console", "pyvmm", FULL, "16550A UART", "ports (THR writes, LSR polls)",
        "virtio_console.elf", "console", console="file:{work}/console.out",
        cmdline="bench_dev=0", count_virtio=False),
    Row("virtio-console", "console", "pyvmm", PARA, "virtio-console",
        "virtio-pci (ioeventfd)", "virtio_console.elf", "console",
        console="file:{work}/console.out", cmdline="bench_dev=1"),
    # QEMU's rows (--with-qemu): the same guest binaries on QEMU's devices.
    Row("qemu-virtio-blk-pci", "disk", "QEMU", PARA, "virtio-blk", "virtio-pci",
        "blkload.elf", "blkload",
        qemu_dev=("-drive", "file={img},format=raw,if=none,id=d0,cache=writeback",
                  "-device", "virtio-blk-pci,drive=d0,disable-legacy=on")),
    Row("qemu-nvme", "disk", "QEMU", FULL, "NVMe", "PCI BAR doorbells, MSI-X", "nvme.elf",
        "nvme", qemu_dev=("-drive", "file={img},format=raw,if=none,id=d0,cache=writeback",
                          "-device", "nvme,drive=d0,serial=q")),
    Row("qemu-ide-dma", "disk", "QEMU", FULL, "IDE/ATA", "ports, bus-master DMA", "ide.elf",
        "ide-dma", cmdline="bench_mode=1", machine="pc",
        qemu_dev=("-drive", "file={img},format=raw,if=ide,cache=writeback")),
    Row("qemu-ide-pio", "disk", "QEMU", FULL, "IDE/ATA", "ports, PIO", "ide.elf",
        "ide-pio", cmdline="bench_mode=0", machine="pc",
        qemu_dev=("-drive", "file={img},format=raw,if=ide,cache=writeback")),
    Row("qemu-e1000", "nic", "QEMU", FULL, "e1000 (82540EM)", "PCI BAR registers, TAP",
        "e1000.elf", "nic", cmdline="qemu=1",
        qemu_dev=("-netdev", "tap,id=n0,ifname={tap},script=no,downscript=no",
                  "-device", "e1000,netdev=n0,mac={mac},romfile=")),
    Row("qemu-virtio-net", "nic", "QEMU", PARA, "virtio-net", "virtio-pci, TAP",
        "virtio_net.elf", "nic", cmdline="qemu=1",
        qemu_dev=("-netdev", "tap,id=n0,ifname={tap},script=no,downscript=no",
                  "-device", "virtio-net-pci,netdev=n0,mac={mac},romfile=,disable-legacy=on")),
)
