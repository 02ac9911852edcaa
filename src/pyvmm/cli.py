"""``pyvmm`` command line. Every error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import enum
import functools
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import pyvmm
from pyvmm import sandbox, schema
from pyvmm.devices.spec import DeviceSpec
from pyvmm.errors import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_KVM,
    ConfigError,
    KvmError,
    KvmUnavailable,
    PvmProbeError,
    PyvmmError,
)
from pyvmm.machine.config import MachineConfig, device_entry, load_json_object
from pyvmm.registry import DEVICES, find
from pyvmm.sandbox import SeccompMode

if TYPE_CHECKING:
    from pyvmm.devices.virtio.blk import VirtioBlk
    from pyvmm.sharing.ratelimit import Limits

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage plus the message; keep it to one line.
        self.exit(EXIT_USAGE, f"pyvmm: error: {message} (see 'pyvmm --help')\n")


class _DeviceArg(argparse.Action):
    """Keeps every device option in one list, in command-line order (slot order)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(ns, "device_args", None) or [])
        items.append((self.dest, "" if values is None else str(values)))
        ns.device_args = items


def add_machine_options(r: argparse.ArgumentParser,
                        registry: tuple[DeviceSpec, ...] = DEVICES) -> None:
    """``pyvmm run``'s options, generated from MachineConfig and the device registry:
    the same declarations as the JSON config, its schema and docs/config.md."""
    r.add_argument("--config", help="JSON file with the same fields (docs/config.md)")
    for f in schema.fields_of(MachineConfig):
        if f.cli == "":
            continue
        flags = [f.cli or "--" + f.name.replace("_", "-")]
        if f.short:
            flags.append(f.short)
        if f.base is bool:
            # A flag sets the non-default value; JSON spells both.
            r.add_argument(*flags, dest=f.name, action="store_const",
                           const="off" if f.default else "on",
                           help=f"leave out {f.doc}" if f.default else f.doc)
            continue
        choices = schema.type_name(f) if isinstance(f.base, type) and issubclass(
            f.base, enum.Enum) else None
        r.add_argument(*flags, dest=f.name, metavar=f.metavar or (
            "{" + choices.replace("|", ",") + "}" if choices else None),
            help=f.doc if f.required else f"{f.doc} (default {schema.default_text(f)})")
    seen: dict[str, list[DeviceSpec]] = {}
    for spec in registry:
        if spec.option:
            seen.setdefault(spec.option, []).append(spec)
    for opt, specs in seen.items():
        first = specs[0]
        needs_value = any(f.required for f in schema.fields_of(first.config))
        keys = sorted({f.key for s in specs for f in schema.fields_of(s.config)})
        sel = ""
        if first.select is not None:
            sel = f"{first.select[0]}={'|'.join(s.select[1] for s in specs if s.select)},"
        r.add_argument(f"--{opt}", dest=opt, action=_DeviceArg,
                       nargs=None if needs_value else "?", metavar="K=V,...",
                       help=f"{', '.join(s.summary for s in specs)}: {sel}"
                       f"{','.join(k + '=..' for k in keys)} (repeatable)")
    r.add_argument("--device", dest="device", action=_DeviceArg, metavar="TYPE[,K=V,...]",
                   help="any device by its type: "
                   + ", ".join(s.name for s in registry) + " (repeatable)")


def device_from_arg(opt: str, text: str, registry: tuple[DeviceSpec, ...] = DEVICES
                    ) -> dict[str, str | list[str]]:
    """One ``--device TYPE,...`` or ``--disk ...`` as a ``{"type": ..., key: value}``."""
    if opt == "device":
        name, _, rest = text.partition(",")
        spec = find(name, registry)
        if spec is None:
            names = [s.name for s in registry]
            raise ConfigError(f"--device {text!r}: unknown device type {name!r}"
                              f"{schema.did_you_mean(name, names)} (one of {', '.join(names)})")
        return {"type": name, **schema.parse_kv(rest, spec.positional, f"--device {name}")}
    specs = [s for s in registry if s.option == opt]
    items = schema.parse_kv(text, specs[0].positional, f"--{opt}")
    chosen = specs[0]
    if chosen.select is not None:
        key = chosen.select[0]
        want = items.pop(key, chosen.select[1])
        if isinstance(want, list):
            raise ConfigError(f"--{opt} {text!r}: {key} given more than once")
        match = [s for s in specs if s.select is not None and s.select[1] == want]
        if not match:
            values = ", ".join(s.select[1] for s in specs if s.select)
            raise ConfigError(f"--{opt} {text!r}: {key} must be one of {values}")
        chosen = match[0]
    return {"type": chosen.name, **items}


def build_parser(registry: tuple[DeviceSpec, ...] = DEVICES) -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm", description="A KVM VMM in Python for seeing, measuring and "
                "changing I/O virtualization.")
    p.add_argument("--version", action="version", version=f"pyvmm {pyvmm.__version__}")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="what pyvmm logs (default warning; -v is info, -vv debug)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log: the host notices (-v), everything (-vv)")
    p.add_argument("--log-file", metavar="PATH", help="append the log to this file instead "
                   "of stderr (one-line errors still go to stderr)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="boot a kernel")
    add_machine_options(r, registry)
    b = sub.add_parser("backend", help="serve a device to other VMMs (vhost-user)")
    b.add_argument("kind", choices=["vhost-user-blk", "vhost-user-net", "vfio-user"],
                   help="what to serve")
    b.add_argument("--tap", help="vfio-user virtio-net: the TAP to attach; vhost-user-net: "
                   "a TAP uplink on the switch")
    b.add_argument("--port-rate", help="vhost-user-net: bytes/s each guest may send into "
                   "the switch (frames over it are dropped)")
    b.add_argument("--port", action="append", default=[], metavar="PATH",
                   help="vhost-user-net: a Unix socket where a VMM's NIC joins the switch "
                   "(--net model=e1000,switch=PATH); repeatable")
    b.add_argument("--device", default="virtio-blk", metavar="TYPE[,K=V,...]",
                   help="vfio-user: the PCI function to export: pci-testdev, or a device "
                   "of the registry (" + ", ".join(s.name for s in registry if s.exportable)
                   + "; default virtio-blk)")
    b.add_argument("--socket", action="append", required=True,
                   help="Unix socket to listen on (repeat with --disk for more images)")
    b.add_argument("--disk", action="append", help="raw image for each socket")
    b.add_argument("--readonly", action="store_true", help="serve the images read-only")
    b.add_argument("--limit", metavar="iops=N,bps=N[,iops_burst=N,bps_burst=N]",
                   help="vhost-user-blk: each socket's own token buckets")
    b.add_argument("--group-limit", metavar="iops=N,bps=N[,...]",
                   help="vhost-user-blk: buckets shared by all sockets, taken in turns "
                   "(one request each while several wait)")
    b.add_argument("--stats-json", metavar="PATH", help="vhost-user-blk: on stop, write "
                   "per-socket requests, bytes, throughput and Jain's fairness index here; "
                   "vfio-user --vfs: the per-VF counters")
    b.add_argument("--vfs", type=int, metavar="N", help="vfio-user nvme: offer N virtual "
                   "functions of one controller process, one --socket each, each with its "
                   "own queues and its own slice of the one --disk as its namespace")
    b.add_argument("--vf-size", metavar="SIZE", help="vfio-user --vfs: each VF's namespace "
                   "(e.g. 64M; default: the image split in N equal parts)")
    b.add_argument("--vf-limit", action="append", metavar="iops=N,bps=N[,...]",
                   help="vfio-user --vfs: token buckets of a VF; once for all VFs, or once "
                   "per VF in --socket order ('none' for no limit)")
    b.add_argument("--seccomp", choices=[m.value for m in SeccompMode],
                   default=SeccompMode.ENFORCE.value, help="the process's system-call "
                   "allow-list once it is set up (docs/security.md; default enforce)")
    i = sub.add_parser("info", help="describe the machine")
    i.add_argument("--machine", action="store_true", help="print the machine map")
    i.add_argument("--devices", action="store_true", help="list the devices of the registry")
    i.add_argument("--no-pci-testdev", action="store_true", help="as for run")
    c = sub.add_parser("config", help="the configuration's reference")
    c.add_argument("--schema", action="store_true", help="print the JSON Schema")
    c.add_argument("--doc", action="store_true", help="print docs/config.md")
    c.add_argument("--openapi", action="store_true",
                   help="print the control API's OpenAPI document (docs/openapi.json)")
    from pyvmm.compare.command import add_arguments as compare_arguments

    cmp = sub.add_parser("compare", help="every device class in every mode: exits, "
                         "interrupts, latency, CPU per operation (docs/comparison.md)")
    compare_arguments(cmp)
    from pyvmm.api import COMMANDS  # a dict only: no HTTP client at start-up

    rm = sub.add_parser("remote", help="control a running VM through its --api-socket "
                        "(exit code 4: unreachable, 5: refused)")
    rm.add_argument("--api-socket", required=True, metavar="PATH",
                    help="the socket given to pyvmm run --api-socket")
    rm.add_argument("--json", action="store_true", help="print the API's JSON answer")
    rm.add_argument("remote_command", metavar="COMMAND", choices=list(COMMANDS),
                    help="one of " + ", ".join(COMMANDS))
    rm.add_argument("device", metavar="DEVICE", nargs="?",
                    help="trace, trace-on, trace-off: the device (a name from 'devices')")
    return p


def _config_from_args(a: argparse.Namespace,
                      registry: tuple[DeviceSpec, ...] = DEVICES) -> MachineConfig:
    board: dict[str, Any] = {}
    for f in schema.fields_of(MachineConfig):
        v = getattr(a, f.name, None)
        if v is not None and f.cli != "":
            board[f.key] = v
    devices = [device_from_arg(opt, text, registry)
               for opt, text in (getattr(a, "device_args", None) or [])]
    if not a.config:
        if not a.kernel:
            raise ConfigError("no kernel given (use --kernel PATH or --config FILE)")
        return MachineConfig.from_dict({**board, "devices": devices}, source="command line",
                                       text=True, registry=registry)
    # A config file, with the command line's options on top of it (and its devices
    # after the file's).
    raw = load_json_object(a.config, "config file")
    if "kernel" in board:
        raw["kernel"] = board.pop("kernel")
    cfg = MachineConfig.from_dict(raw, source=a.config, registry=registry)
    fields = {f.key: f for f in schema.fields_of(MachineConfig)}
    for key, value in board.items():
        try:
            setattr(cfg, fields[key].name, schema.convert(fields[key], value, text=True))
        except ValueError as e:
            raise ConfigError(f"command line: {key}: {e}") from None
    cfg.devices += [device_entry(d, f"command line: device {i}", registry, text=True)
                    for i, d in enumerate(devices)]
    try:
        cfg.check()
    except ValueError as e:
        raise ConfigError(f"command line: {e}") from None
    return cfg


def _info(a: argparse.Namespace) -> int:
    from pyvmm.bus import IoBus, MmioBus
    from pyvmm.irq.msi import RecordingMsiSink
    from pyvmm.machine.layout import MACHINE_MAP
    from pyvmm.machine.pci import build_pci, describe
    from pyvmm.memory import GuestMemory

    if a.devices:
        print(f"{'type':16} {'kind':6} {'option':24} summary")
        for spec in DEVICES:
            opt = ""
            if spec.option:
                opt = f"--{spec.option}" + (f" {spec.select[0]}={spec.select[1]}"
                                            if spec.select else "")
            print(f"{spec.name:16} {spec.kind.value:6} {opt:24} {spec.summary}")
        return 0
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
    from pyvmm.sharing.ratelimit import Limits, RateGroup
    from pyvmm.vhost_user.backend import VhostUserServer

    if a.kind == "vfio-user":
        return _vfio_user(a)
    if a.kind == "vhost-user-net":
        return _vhost_user_net(a)
    if not a.disk or len(a.socket) != len(a.disk):
        raise ConfigError("give one --disk for each --socket")
    limits = _limits(a.limit, "--limit")
    group_limits = _limits(a.group_limit, "--group-limit")
    if a.stats_json:
        _check_writable(a.stats_json, "--stats-json")
    server = VhostUserServer()
    group = (None if group_limits is None
             else RateGroup(group_limits, server.events.call_later))
    backends = [RawBlockBackend(d, a.readonly) for d in a.disk]  # checks every image first
    # shared by every session: requests that would block on the disk
    pool = IoPool(thread_init=functools.partial(sandbox.apply, "io-pool", a.seccomp))
    served: list[list[VirtioBlk]] = [[] for _ in a.socket]  # per socket, each session's

    def make(i: int, be: RawBlockBackend) -> VirtioBlk:
        dev = VirtioBlk(be, serial=f"pyvmm-vu{i}", pool=pool,
                        limits=limits or Limits(), call_later=server.events.call_later,
                        group=group)
        served[i].append(dev)
        return dev

    for i, (path, be) in enumerate(zip(a.socket, backends, strict=True)):
        try:
            server.listen(path, functools.partial(make, i, be))
        except OSError as e:
            raise ConfigError(f"cannot listen on {path}: {e.strerror}") from None
    try:
        return _serve(server, f"vhost-user-blk serving {len(backends)} image(s)", a.seccomp)
    finally:
        _blk_stats(a.socket, served, a.stats_json)


def _limits(text: str | None, opt: str) -> Limits | None:
    from pyvmm.devices.spec import LimitsConfig

    if text is None:
        return None
    cfg = schema.build(LimitsConfig, schema.parse_kv(text, None, opt), opt, text=True)
    if all(v is None for v in cfg.limits()):
        raise ConfigError(f"{opt}: give iops=N and/or bps=N")
    return cfg.limits()


def _check_writable(path: str, opt: str) -> None:
    """Fail now, not after serving for an hour; creates nothing."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{opt} {path}: folder {folder} is missing or not writable")
    if os.path.isdir(path):
        raise ConfigError(f"{opt} {path}: is a folder")


def _blk_stats(sockets: list[str], served: list[list[VirtioBlk]], path: str | None) -> None:
    """The physical side's view when the backend stops: what each socket's sessions
    were served, and how fairly (Jain's index over the shares while all were busy)."""
    import json

    from pyvmm.sharing.ratelimit import jain, shares_in_common_window

    rows = []
    for sock, devs in zip(sockets, served, strict=True):
        reqs = sum(d.requests for d in devs)
        nbytes = sum(d.bytes for d in devs)
        lims = [d.limiter for d in devs if d.limiter is not None and d.limiter.log]
        t0 = min((lim.log[0] for lim in lims), default=0.0)
        t1 = max((lim.log[-1] for lim in lims), default=0.0)
        secs = t1 - t0
        rows.append({"socket": sock, "sessions": len(devs), "requests": reqs,
                     "bytes": nbytes, "throttled": sum(lim.throttled for lim in lims),
                     "seconds": round(secs, 3),
                     "requests_per_s": round(reqs / secs, 1) if secs > 0 else None})
    last = [devs[-1].limiter for devs in served if devs and devs[-1].limiter is not None]
    shares = shares_in_common_window(last) if len(last) == len(served) else []
    logs = [lim.log for devs in served for d in devs
            if (lim := d.limiter) is not None and lim.log]
    span = max(x[-1] for x in logs) - min(x[0] for x in logs) if logs else 0.0
    out = {"sockets": rows, "span_seconds": round(span, 3), "common_window_shares": shares,
           "jain": round(jain([float(x) for x in shares]), 4) if shares else None}
    for r in rows:
        print(f"pyvmm: {r['socket']}: {r['requests']} requests, {r['bytes']} bytes, "
              f"{r['throttled']} throttled", file=sys.stderr)
    if shares:
        print(f"pyvmm: shares while all were busy {shares}: Jain {out['jain']}",
              file=sys.stderr)
    if path:
        try:
            with open(path, "w") as f:
                json.dump(out, f, indent=2)
                f.write("\n")
        except OSError as e:
            print(f"pyvmm: cannot write --stats-json {path}: {e.strerror}", file=sys.stderr)


def _vhost_user_net(a: argparse.Namespace) -> int:
    """One virtio-net per socket, all ports of one learning switch (plus a TAP uplink
    with --tap): guests on different sockets reach each other through it."""
    from pyvmm.backends.tap import Tap
    from pyvmm.devices.virtio.net import VirtioNet
    from pyvmm.peer.listener import UnixListener
    from pyvmm.sharing.switch import Switch
    from pyvmm.vhost_user.backend import VhostUserServer

    if a.disk:
        raise ConfigError("vhost-user-net takes no --disk")
    rate = None
    if a.port_rate is not None:
        try:
            rate = int(a.port_rate, 0)
        except ValueError:
            raise ConfigError(f"port-rate {a.port_rate!r} is not a number") from None
    if rate is not None and rate <= 0:
        raise ConfigError("port-rate must be a positive number of bytes per second")
    server = VhostUserServer()
    switch = Switch(server.events)
    if a.tap:
        switch.uplink(Tap(a.tap))
    for path in a.port:  # a VMM's NIC per connection, handed its port's socket
        server.listeners.append(UnixListener(
            path, server.events, functools.partial(switch.serve_port, name=path, rate=rate),
            errors=server.errors))
    for i, path in enumerate(a.socket):
        port = switch.port(path, rate)  # one port per socket, kept across reconnects
        mac = bytes((0x52, 0x54, 0x00, 0x00, 0x01, i + 1))
        try:
            server.listen(path, functools.partial(VirtioNet, port, mac, server.events))
        except OSError as e:
            raise ConfigError(f"cannot listen on {path}: {e.strerror}") from None
    return _serve(server, f"vhost-user-net: a switch with {len(a.socket)} port(s)"
                  + (f", {len(a.port)} VMM port socket(s)" if a.port else "")
                  + (f" and uplink {a.tap}" if a.tap else ""), a.seccomp)


class _Server(Protocol):
    def serve_forever(self) -> None: ...

    def close(self) -> None: ...


def _serve(server: _Server, what: str, seccomp: str) -> int:
    print(f"pyvmm: {what}", file=sys.stderr, flush=True)
    # SIGTERM is a clean stop too: sockets removed, sessions closed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Set up (images open, sockets listening): from here on the process does only what
    # serving needs. Threads started before (an I/O pool) filter themselves.
    sandbox.prepare(seccomp)
    sandbox.apply("backend", seccomp)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()
    return 0


def _vfio_user(a: argparse.Namespace) -> int:
    """Export one PCI function: the PCI test device, or any device of the registry (a
    virtio device behind its virtio-pci transport), made by its spec as in the VMM."""
    from pyvmm.devices.pci.device import PCIDevice
    from pyvmm.devices.pci.testdev import PciTestDev
    from pyvmm.devices.spec import Kind
    from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
    from pyvmm.event import EventManager
    from pyvmm.irq.msi import RecordingMsiSink
    from pyvmm.machine.export import ExportContext
    from pyvmm.memory import GuestMemory
    from pyvmm.vfio_user.server import VfioUserServer

    if a.vfs is not None:
        return _vfio_user_vfs(a)
    if a.vf_size is not None or a.vf_limit:
        raise ConfigError("--vf-size and --vf-limit need --vfs N")
    if len(a.socket) != 1:
        raise ConfigError("vfio-user serves one --socket (or one per VF with --vfs)")
    events = EventManager()
    name, _, rest = a.device.partition(",")
    if name == "pci-testdev":
        def make(mem: GuestMemory) -> PCIDevice:
            return PciTestDev(mem, RecordingMsiSink())
    else:
        spec = find(name, DEVICES)
        if spec is None or not spec.exportable or spec.kind is Kind.ISA:
            names = ["pci-testdev", *(s.name for s in DEVICES if s.exportable)]
            raise ConfigError(f"vfio-user: cannot export {name!r}"
                              f"{schema.did_you_mean(name, names)} (one of {', '.join(names)})")
        items = schema.parse_kv(rest, spec.positional, f"--device {name}")
        keys = {f.key for f in schema.fields_of(spec.config)}
        # The older spelling: --disk IMG, --readonly and --tap NAME fill the keys.
        if a.disk and "path" in keys:
            if len(a.disk) != 1:
                raise ConfigError(f"vfio-user {name} takes one --disk")
            items.setdefault("path", a.disk[0])
        if a.readonly and "readonly" in keys:
            items.setdefault("readonly", "on")
        if a.tap and "tap" in keys:
            items.setdefault("tap", a.tap)
        cfg = device_entry({"type": name, **items}, "--device", DEVICES, text=True).config
        chosen = spec

        def make(mem: GuestMemory) -> PCIDevice:
            # The MSI sink is unused: an exported function's MSI-X goes to the client's
            # eventfds (MsixCapability.direct), set by the session.
            ctx = ExportContext(chosen, mem, events)
            dev = chosen.create(cfg, ctx)
            fn: PCIDevice = (VirtioPciDevice(dev, mem, RecordingMsiSink())
                             if chosen.kind is Kind.VIRTIO else dev)
            ctx.attach(fn)
            return fn

        make(GuestMemory()).close()  # open and check everything now: errors before listening

    try:
        server = VfioUserServer(a.socket[0], make, events)
    except OSError as e:
        raise ConfigError(f"cannot listen on {a.socket[0]}: {e.strerror}") from None
    return _serve(server, f"vfio-user exporting {name}", a.seccomp)


def _vfio_user_vfs(a: argparse.Namespace) -> int:
    """N NVMe virtual functions over one image (vfio_user/vfs.py), one socket each;
    the physical function's view printed (and --stats-json written) on stop."""
    from pyvmm.backends.block import RawBlockBackend
    from pyvmm.vfio_user.vfs import NvmeFunctions, slice_size

    if a.device != "nvme":
        raise ConfigError(f"--vfs: virtual functions are NVMe's (--device nvme), not "
                          f"{a.device!r}")
    if not a.disk or len(a.disk) != 1:
        raise ConfigError("--vfs takes one --disk: the image the VFs share")
    if len(a.socket) != a.vfs:
        raise ConfigError(f"--vfs {a.vfs} needs {a.vfs} --socket, one per VF "
                          f"({len(a.socket)} given)")
    if len(set(a.socket)) != len(a.socket):
        raise ConfigError("--vfs: every VF needs a socket of its own")
    vf_size = None
    if a.vf_size is not None:
        try:
            vf_size = schema.parse_size(a.vf_size)
        except ValueError as e:
            raise ConfigError(f"--vf-size: {e}") from None
    limits: list[Limits | None] = []
    for text in a.vf_limit or []:
        limits.append(None if text == "none" else _limits(text, "--vf-limit"))
    if len(limits) == 1:
        limits = limits * a.vfs
    if limits and len(limits) != a.vfs:
        raise ConfigError(f"give --vf-limit once for all VFs or once per VF ({len(limits)} "
                          f"for {a.vfs} VFs)")
    if a.stats_json:
        _check_writable(a.stats_json, "--stats-json")
    image = RawBlockBackend(a.disk[0], a.readonly)  # checks and locks it first
    try:
        size = slice_size(image.size, a.vfs, vf_size)  # one clear line before listening
        try:
            pf = NvmeFunctions(image, a.socket, size, limits or None)
        except OSError as e:
            raise ConfigError(f"cannot listen on a VF socket: {e.strerror}") from None
        try:
            return _serve(pf, f"vfio-user: {a.vfs} NVMe VFs of {size} bytes each over "
                          f"{a.disk[0]}", a.seccomp)
        finally:
            _vf_stats(pf.report(), a.stats_json)
    finally:
        image.close()


def _vf_stats(rep: dict[str, Any], path: str | None) -> None:
    import json

    for vf in rep["vfs"]:
        lim = ",".join(f"{k}={v}" for k, v in vf["limits"].items()) or "none"
        print(f"pyvmm: VF {vf['vf']} {vf['socket']}: LBAs {vf['offset'] // 512}+"
              f"{vf['size'] // 512}, {vf['sessions']} session(s), {vf['commands']} "
              f"commands, {vf['bytes']} bytes, {vf['failures']} failed, "
              f"{vf['throttled']} throttled, limits {lim}", file=sys.stderr)
    if path:
        try:
            with open(path, "w") as f:
                f.write(json.dumps(rep, indent=2) + "\n")
        except OSError as e:
            print(f"pyvmm: cannot write --stats-json {path}: {e.strerror}", file=sys.stderr)


def _config_ref(a: argparse.Namespace) -> int:
    import json

    from pyvmm.machine.config import config_schema
    from pyvmm.machine.configdoc import config_doc

    if a.openapi:
        from pyvmm.api.openapi import openapi_document

        print(json.dumps(openapi_document(), indent=2))
    elif a.schema:
        print(json.dumps(config_schema(), indent=2))
    else:
        print(config_doc(), end="")
    return 0


def _run_with_api(cfg: MachineConfig, run_machine: Any) -> int:
    """``run`` with the control API: the socket path is claimed before the VM is built
    (a path that is taken is one line, nothing built) and removed when the VM stops."""
    assert cfg.api_socket is not None
    try:
        from pyvmm.api.server import ApiServer
    except ImportError as e:  # aiohttp is a dependency; a broken install says so
        raise ConfigError(f"--api-socket needs the aiohttp package ({e})") from None
    from pyvmm.machine.config import web_address

    server = ApiServer(cfg.api_socket,
                       tcp=None if cfg.web is None else web_address(cfg.web))
    try:
        code: int = run_machine(cfg, attach=server.attach).exit_code
        return code
    finally:
        server.close()


def _setup_logging(a: argparse.Namespace) -> None:
    level = (a.log_level.upper() if a.log_level else
             "DEBUG" if a.verbose >= 2 else "INFO" if a.verbose == 1 else "WARNING")
    if a.log_file:
        try:
            handler: logging.Handler = logging.FileHandler(a.log_file, "a")  # asked for
        except OSError as e:
            raise ConfigError(f"cannot open --log-file {a.log_file}: {e.strerror}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s pyvmm: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("pyvmm: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _setup_logging(args)
    except ConfigError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "config":
            return _config_ref(args)
        if args.command == "backend":
            return _backend(args)
        if args.command == "compare":
            from pyvmm.compare.command import run as compare

            return compare(args)
        if args.command == "remote":
            from pyvmm.api.client import run

            return run(args.api_socket, args.remote_command, args.json, device=args.device)
        cfg = _config_from_args(args)
        cfg.validate()
        from pyvmm.machine.vm import run_machine

        if cfg.api_socket is None:
            return run_machine(cfg).exit_code
        return _run_with_api(cfg, run_machine)
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
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["build_parser", "main"]
