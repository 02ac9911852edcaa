"""The register-decoded trace on real device models at their real ports: the 16550A's
registers by name with DLAB honoured, line settings decoded (``LCR write 0x03 (8N1,
DLAB=0)``), PCI configuration cycles through 0xCF8/0xCFC and ECAM named by BDF and
header register; accesses pass through unchanged; off means the bus holds the device
itself again (the hot path pays nothing)."""

from __future__ import annotations

from pyvmm.api.trace import DeviceTrace, format_entry, lcr_meaning, parse_request
from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.legacy.uart import Serial
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.machine import layout as L
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory


def trace_on(bus: IoBus | MmioBus, name: str) -> tuple[DeviceTrace, list[object]]:
    ranges = [(bus.kind, r) for r in bus.ranges() if r.name == name]
    originals = [r.device for _, r in ranges]
    t = DeviceTrace(name)
    t.enable(ranges, 64, 0.0, lambda: None)
    return t, originals


def test_uart_registers_named_and_decoded() -> None:
    out: list[bytes] = []
    pio = IoBus()
    pio.insert(Serial(output=out.append), L.COM1_BASE, 8, "serial0")
    t, originals = trace_on(pio, "serial0")
    b = L.COM1_BASE
    pio.write(b + 3, 1, 0x80)  # DLAB=1: offsets 0/1 are the divisor latch
    pio.write(b + 0, 1, 0x01)
    pio.write(b + 1, 1, 0x00)
    pio.write(b + 3, 1, 0x03)  # 8N1, DLAB=0
    pio.write(b + 1, 1, 0x01)  # IER: RDI
    pio.write(b + 2, 1, 0xC7)  # FCR
    pio.write(b + 4, 1, 0x0B)  # MCR: DTR RTS OUT2
    pio.write(b + 0, 1, ord("A"))
    lsr = pio.read(b + 5, 1)
    assert out == [b"A"]  # the access reached the device
    lines = t.lines()
    assert lines[:8] == [
        "serial0 LCR write 0x80 (5N1, DLAB=1)",
        "serial0 DLL write 0x01 (divisor latch low)",
        "serial0 DLM write 0x00 (divisor latch high)",
        "serial0 LCR write 0x03 (8N1, DLAB=0)",
        "serial0 IER write 0x01 (RDI)",
        "serial0 FCR write 0xc7 (ENABLE_FIFO, CLEAR_RCVR, CLEAR_XMIT; trigger 14)",
        "serial0 MCR write 0x0b (DTR, RTS, OUT2)",
        "serial0 THR write 0x41 ('A')",
    ]
    assert lines[8].startswith(f"serial0 LSR read {lsr:#04x} (") and "THRE" in lines[8]
    e = t.snapshot().entries[3]
    assert (e.bus, e.range, e.offset, e.size, e.access, e.value, e.vcpu) == (
        "pio", "serial0", 3, 1, "write", 3, None)
    t.disable()
    assert [r.device for r in pio.ranges()] == originals
    pio.write(b + 7, 1, 0x55)
    assert len(t.snapshot().entries) == 9  # off: nothing recorded


def test_lcr_meanings() -> None:
    assert lcr_meaning(0x1F) == "8E2, DLAB=0"
    assert lcr_meaning(0x0A) == "7O1, DLAB=0"
    assert lcr_meaning(0xC3) == "8N1, DLAB=1, break"


def test_pci_config_cycles_named_by_bdf_and_register() -> None:
    pio, mmio = IoBus(), MmioBus()
    with GuestMemory([(0, 2 << 20)]) as mem:
        build_pci(pio, mmio, mem, RecordingMsiSink())
        t, _ = trace_on(pio, "pci-config")
        e, _ = trace_on(mmio, "pci-ecam")
        cf8 = L.PCI_CONFIG_PORT
        pio.write(cf8, 4, 0x80000800)  # 00:01.0, register 0
        vendor = pio.read(cf8 + 4, 2)
        pio.write(cf8, 4, 0x80000804)
        pio.write(cf8 + 4, 2, 0x0007)  # COMMAND: IO MEMORY MASTER
        pio.write(cf8, 4, 0x80000810)
        pio.read(cf8 + 4, 4)  # BAR0
        pio.write(cf8, 4, 0x00000800)  # enable bit clear
        pio.read(cf8 + 4, 4)
        dev_id = mmio.read(L.PCI_ECAM_BASE + (1 << 15) + 2, 2)
        assert t.lines() == [
            "pci-config CONFIG_ADDRESS write 0x80000800 (00:01.0 VENDOR_ID)",
            f"pci-config CONFIG_DATA read {vendor:#06x} (00:01.0 VENDOR_ID)",
            "pci-config CONFIG_ADDRESS write 0x80000804 (00:01.0 COMMAND)",
            "pci-config CONFIG_DATA write 0x0007 (00:01.0 COMMAND = IO, MEMORY, MASTER)",
            "pci-config CONFIG_ADDRESS write 0x80000810 (00:01.0 BAR0)",
            f"pci-config CONFIG_DATA read {t.snapshot().entries[5].value:#010x} "
            "(00:01.0 BAR0)",
            "pci-config CONFIG_ADDRESS write 0x00000800 (00:01.0 VENDOR_ID, disabled)",
            "pci-config CONFIG_DATA read 0xffffffff (CONFIG_ADDRESS not enabled: no "
            "config cycle)",
        ]
        assert vendor == 0x1234  # the PCI test device answered through the tracer
        assert e.lines() == [f"pci-ecam ECAM read {dev_id:#06x} (00:01.0 DEVICE_ID)"]


def test_generic_device_by_offset_and_depth_bounds_the_ring() -> None:
    pio = IoBus()

    class Reg:
        def read(self, base: int, offset: int, size: int) -> int:
            return 0x5A

        def write(self, base: int, offset: int, size: int, value: int) -> None:
            pass

    pio.insert(Reg(), 0x500, 16, "thing")
    ranges = [(pio.kind, r) for r in pio.ranges()]
    t = DeviceTrace("thing")
    t.enable(ranges, 3, 0.0, lambda: None)
    for i in range(10):
        pio.write(0x500 + (i % 16), 1, i)
    assert [format_entry("thing", x) for x in t.snapshot().entries] == [
        "thing +0x7 write 0x07", "thing +0x8 write 0x08", "thing +0x9 write 0x09"]
    assert pio.read(0x504, 1) == 0x5A


def test_trace_request_is_checked() -> None:
    assert parse_request({"enabled": True}) == (True, 256)
    assert parse_request({"enabled": False, "depth": 10}) == (False, 10)
    for bad in ({}, {"enabled": "yes"}, {"enabled": True, "depth": 0},
                {"enabled": True, "depth": True}, {"enabled": True, "depth": 1 << 20},
                {"enabled": True, "colour": 1}):
        try:
            parse_request(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
