"""Issue #10's acceptance: a device is its module plus a registry line. Here the
"modules" are in the test and the registry is the test's own tuple: a throwaway virtio
device and a throwaway ISA device, and a tiny guest that finds both — the virtio one by
enumerating PCI, the ISA one by probing its port. No file of pyvmm changes for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyvmm import cli
from pyvmm.devices.spec import DeviceConfig, DeviceSpec, HostContext, IsaRange, Kind, VirtioConfig
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine
from pyvmm.registry import DEVICES
from pyvmm.schema import option

ECHO_TYPE = 42  # a virtio device ID no real device uses here: PCI device 0x1040 + 42


class Echo(VirtioDevice):
    device_type = ECHO_TYPE
    queue_max_sizes = (8,)

    def process_queue(self, index: int) -> None:
        pass


@dataclass(kw_only=True)
class EchoConfig(VirtioConfig):
    greeting: str = option("hi", "unused: shows a device option on the command line")


@dataclass(kw_only=True)
class ScratchConfig(DeviceConfig):
    initial: int = option(0, "what the port reads before the guest writes it")


class Scratch:
    """A 32-bit scratch register at a fixed port, as an ISA chip would have."""

    def __init__(self, initial: int) -> None:
        self.value = initial

    def read(self, base: int, offset: int, size: int) -> int:
        return self.value

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        self.value = value


def make_echo(cfg: EchoConfig, ctx: HostContext) -> Echo:
    return Echo()


def make_scratch(cfg: ScratchConfig, ctx: HostContext) -> Scratch:
    return Scratch(cfg.initial)


REGISTRY = (*DEVICES,
            DeviceSpec("test-echo", EchoConfig, Kind.VIRTIO, make_echo, "a throwaway virtio "
                       "device"),
            DeviceSpec("test-scratch", ScratchConfig, Kind.ISA, make_scratch,
                       "a throwaway ISA scratch register", isa=(IsaRange("pio", 0x510, 4),)))


def boot(cfg: MachineConfig, out: Path) -> str:
    with Machine(cfg) as m:
        r = m.run()
        assert (r.reason, r.exit_code) == ("reset", 0), r.message  # main returned 0
        table = m.format_exit_table()
    assert "test-scratch0" in table  # the exit table names it like any device
    return out.read_text()


def test_devices_from_the_registry_alone_are_found_by_the_guest(guests: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "serial.txt"
    cfg = MachineConfig.from_dict({
        "kernel": str(guests / "probe.elf"), "cmdline": "port=0x510", "quiet": True,
        "serial": f"file:{out}",
        "devices": [{"type": "test-echo", "transport": "pci"},
                    {"type": "test-scratch", "initial": 7}]}, registry=REGISTRY)
    text = boot(cfg, out)
    assert "probe port 0x510: before=0x7 after=0x5a5a0510" in text
    assert f"probe pci 00:02.0 1af4:{0x1040 + ECHO_TYPE:04x}" in text  # first free slot


def test_the_command_line_knows_them_too(guests: Path, tmp_path: Path) -> None:
    out = tmp_path / "serial.txt"
    parser = cli.build_parser(REGISTRY)
    a = parser.parse_args(["run", "-q", "--kernel", str(guests / "probe.elf"), "--cmdline",
                           "port=0x510", "--serial", f"file:{out}", "--device",
                           "test-scratch,initial=0x9", "--device", "test-echo,greeting=yo"])
    cfg = cli._config_from_args(a, REGISTRY)
    text = boot(cfg, out)
    assert "probe port 0x510: before=0x9 after=0x5a5a0510" in text
    assert f"1af4:{0x1040 + ECHO_TYPE:04x}" in text
