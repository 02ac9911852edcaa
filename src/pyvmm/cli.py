"""``pyvmm`` command line. Every error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from typing import NoReturn, Protocol

from pyvmm.errors import ConfigError, KvmError, KvmUnavailable, PvmProbeError, PyvmmError
from pyvmm.machine.config import MachineConfig, SerialConfig, parse_int, parse_size

EXIT_USAGE = 2
EXIT_CONFIG = 2
EXIT_KVM = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage plus the message; keep it to one line.
        self.exit(EXIT_USAGE, f"pyvmm: error: {message} (see 'pyvmm --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm", description="A KVM VMM in Python for seeing, measuring and "
                "changing I/O virtualization.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="boot a kernel")
    r.add_argument("--config", help="JSON file with the same fields as the options")
    r.add_argument("--kernel", help="ELF (PVH note or 64-bit), multiboot, or flat image")
    r.add_argument("--memory", "-m", help="guest RAM, e.g. 64M or 1G (default 64M)")
    r.add_argument("--cmdline", help="kernel command line")
    r.add_argument("--serial", help="stdio (default), file:PATH, socket:PATH or none")
    r.add_argument("--load-addr", help="load a flat binary here (forces the flat format)")
    r.add_argument("--entry", help="entry address of a flat binary (default: load address)")
    r.add_argument("--exits-json", help="write per-device exit accounting as JSON here")
    r.add_argument("--debug-exit-port", help="test-exit port (default 0xf4)")
    r.add_argument("--debug-exit-size", help="test-exit port width: 1, 2 or 4 (default 4)")
    r.add_argument("--irqchip", help="kernel (KVM's PIC/IOAPIC/PIT, default) or split "
                   "(LAPIC in KVM, PIC/IOAPIC/PIT in Python)")
    r.add_argument("--timeout", help="stop the VM after this many seconds (exit code 124)")
    r.add_argument("--quiet", "-q", action="store_true", help="no exit table or notices")
    r.add_argument("--disk", action="append",
                   help="disk: path=IMG[,readonly=on][,transport=pci|mmio][,if=virtio|nvme] "
                   "(repeatable)")
    r.add_argument("--rng", nargs="?", const="pci", choices=["pci", "mmio"],
                   help="add a virtio-rng device (optionally =mmio)")
    r.add_argument("--rng-rate", help="virtio-rng: at most this many bytes per second")
    r.add_argument("--msi", help="irqfd (default: an irqfd and GSI route per device vector) "
                   "or signal (KVM_SIGNAL_MSI per message)")
    r.add_argument("--console", help="virtio-console host end: stdio, file:PATH, socket:PATH")
    r.add_argument("--console-transport", choices=["pci", "mmio"], help="default pci")
    r.add_argument("--net", action="append",
                   help="virtio-net on a TAP: tap=NAME|auto[,mac=52:54:00:..] (repeatable)")
    r.add_argument("--no-pci-testdev", action="store_true",
                   help="leave the PCI test device (00:01.0) out")
    b = sub.add_parser("backend", help="serve a device to other VMMs (vhost-user)")
    b.add_argument("kind", choices=["vhost-user-blk", "vhost-user-net", "vfio-user"],
                   help="what to serve")
    b.add_argument("--tap", help="vfio-user virtio-net: the TAP to attach; vhost-user-net: "
                   "a TAP uplink on the switch")
    b.add_argument("--port-rate", help="vhost-user-net: bytes/s each guest may send into "
                   "the switch (frames over it are dropped)")
    b.add_argument("--device", choices=["pci-testdev", "virtio-blk", "virtio-net", "nvme"],
                   default="virtio-blk",
                   help="vfio-user: the PCI function to export (default virtio-blk)")
    b.add_argument("--socket", action="append", required=True,
                   help="Unix socket to listen on (repeat with --disk for more images)")
    b.add_argument("--disk", action="append", help="raw image for each socket")
    b.add_argument("--readonly", action="store_true", help="serve the images read-only")
    i = sub.add_parser("info", help="describe the machine")
    i.add_argument("--machine", action="store_true", help="print the machine map")
    i.add_argument("--no-pci-testdev", action="store_true", help="as for run")
    return p


def _config_from_args(a: argparse.Namespace) -> MachineConfig:
    fields = {
        "kernel": a.kernel, "memory": a.memory, "cmdline": a.cmdline, "serial": a.serial,
        "load_addr": a.load_addr, "entry": a.entry, "exits_json": a.exits_json,
        "debug_exit_port": a.debug_exit_port, "debug_exit_size": a.debug_exit_size,
        "timeout": a.timeout, "irqchip": a.irqchip, "disks": a.disk,
        "nets": a.net, "console": a.console, "console_transport": a.console_transport,
        "rng": a.rng, "rng_rate": a.rng_rate, "msi": a.msi,
    }
    if a.config:
        cfg = MachineConfig.from_json(a.config, fields)
    else:
        if not a.kernel:
            raise ConfigError("no kernel given (use --kernel PATH or --config FILE)")
        cfg = MachineConfig.from_dict({k: v for k, v in fields.items() if v is not None},
                                      source="command line")
    if a.quiet:
        cfg.quiet = True
    if a.no_pci_testdev:
        cfg.pci_testdev = False

    return cfg


def _info(a: argparse.Namespace) -> int:
    from pyvmm.bus import IoBus, MmioBus
    from pyvmm.irq.chip import RecordingMsiSink
    from pyvmm.machine.layout import MACHINE_MAP
    from pyvmm.machine.pci import build_pci, describe
    from pyvmm.memory import GuestMemory

    print(f"{'name':16} {'space':5} {'base':>12} {'size':>8}  gsi  what")
    for e in MACHINE_MAP:
        gsi = "" if e.gsi is None else str(e.gsi)
        print(f"{e.name:16} {e.space:5} {e.base:#12x} {e.size:#8x}  {gsi:3}  {e.what}")
    print()
    with GuestMemory([(0, 2 << 20)]) as mem:
        root = build_pci(IoBus(), MmioBus(), mem, RecordingMsiSink(), not a.no_pci_testdev)
        for line in describe(root):
            print(line)
    return 0


def _backend(a: argparse.Namespace) -> int:
    from pyvmm.backends.block import RawBlockBackend
    from pyvmm.backends.io_pool import IoPool
    from pyvmm.devices.virtio.blk import VirtioBlk
    from pyvmm.vhost_user.backend import VhostUserServer

    if a.kind == "vfio-user":
        return _vfio_user(a)
    if a.kind == "vhost-user-net":
        return _vhost_user_net(a)
    if not a.disk or len(a.socket) != len(a.disk):
        raise ConfigError("give one --disk for each --socket")
    server = VhostUserServer()
    backends = [RawBlockBackend(d, a.readonly) for d in a.disk]  # checks every image first
    pool = IoPool()  # shared by every session: requests that would block on the disk
    for i, (path, be) in enumerate(zip(a.socket, backends, strict=True)):
        try:
            server.listen(path, functools.partial(VirtioBlk, be, serial=f"pyvmm-vu{i}",
                                                  pool=pool))
        except OSError as e:
            raise ConfigError(f"cannot listen on {path}: {e.strerror}") from None
    return _serve(server, f"vhost-user-blk serving {len(backends)} image(s)")


def _vhost_user_net(a: argparse.Namespace) -> int:
    """One virtio-net per socket, all ports of one learning switch (plus a TAP uplink
    with --tap): guests on different sockets reach each other through it."""
    from pyvmm.backends.tap import Tap
    from pyvmm.devices.virtio.net import VirtioNet
    from pyvmm.sharing.switch import Switch
    from pyvmm.vhost_user.backend import VhostUserServer

    if a.disk:
        raise ConfigError("vhost-user-net takes no --disk")
    rate = None if a.port_rate is None else parse_int(a.port_rate, "port-rate")
    if rate is not None and rate <= 0:
        raise ConfigError("port-rate must be a positive number of bytes per second")
    server = VhostUserServer()
    switch = Switch(server.events)
    if a.tap:
        switch.uplink(Tap(a.tap))
    for i, path in enumerate(a.socket):
        port = switch.port(path, rate)  # one port per socket, kept across reconnects
        mac = bytes((0x52, 0x54, 0x00, 0x00, 0x01, i + 1))
        try:
            server.listen(path, functools.partial(VirtioNet, port, mac, server.events))
        except OSError as e:
            raise ConfigError(f"cannot listen on {path}: {e.strerror}") from None
    return _serve(server, f"vhost-user-net: a switch with {len(a.socket)} port(s)"
                  + (f" and uplink {a.tap}" if a.tap else ""))


class _Server(Protocol):
    def serve_forever(self) -> None: ...

    def close(self) -> None: ...


def _serve(server: _Server, what: str) -> int:
    print(f"pyvmm: {what}", file=sys.stderr, flush=True)
    # SIGTERM is a clean stop too: sockets removed, sessions closed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()
    return 0


def _vfio_user(a: argparse.Namespace) -> int:
    from pyvmm.backends.block import RawBlockBackend
    from pyvmm.backends.tap import Tap
    from pyvmm.devices.nvme.controller import NvmeController
    from pyvmm.devices.pci.device import PCIDevice
    from pyvmm.devices.pci.testdev import PciTestDev
    from pyvmm.devices.virtio.blk import VirtioBlk
    from pyvmm.devices.virtio.net import VirtioNet
    from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
    from pyvmm.event import EventManager
    from pyvmm.irq.chip import RecordingMsiSink
    from pyvmm.memory import GuestMemory
    from pyvmm.vfio_user.server import VfioUserServer

    if len(a.socket) != 1:
        raise ConfigError("vfio-user serves one --socket")
    backend = None
    tap = None
    if a.device in ("virtio-blk", "nvme"):
        if not a.disk or len(a.disk) != 1:
            raise ConfigError(f"vfio-user {a.device} needs one --disk")
        backend = RawBlockBackend(a.disk[0], a.readonly)
    if a.device == "virtio-net":
        if not a.tap:
            raise ConfigError("vfio-user virtio-net needs --tap NAME")
        tap = Tap(a.tap)
    events = EventManager()

    def make(mem: GuestMemory) -> PCIDevice:
        # The MSI sink is unused: an exported function's MSI-X goes to the client's
        # eventfds (MsixCapability.direct), set by the session.
        if a.device == "pci-testdev":
            return PciTestDev(mem, RecordingMsiSink())
        if tap is not None:
            net = VirtioNet(tap, bytes.fromhex("525400123470"), events)
            return VirtioPciDevice(net, mem, RecordingMsiSink())
        assert backend is not None
        if a.device == "nvme":
            return NvmeController(backend, mem, RecordingMsiSink(), serial="pyvmm-vfu-nvme")
        return VirtioPciDevice(VirtioBlk(backend, serial="pyvmm-vfu"), mem, RecordingMsiSink())

    try:
        server = VfioUserServer(a.socket[0], make, events)
    except OSError as e:
        raise ConfigError(f"cannot listen on {a.socket[0]}: {e.strerror}") from None
    return _serve(server, f"vfio-user exporting {a.device}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="pyvmm: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "backend":
            return _backend(args)
        cfg = _config_from_args(args)
        cfg.validate()
        from pyvmm.machine.vm import run_machine

        return run_machine(cfg).exit_code
    except (KvmUnavailable, PvmProbeError) as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_KVM
    except ConfigError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KvmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_KVM
    except PyvmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["SerialConfig", "build_parser", "main", "parse_int", "parse_size"]
