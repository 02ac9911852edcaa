"""Machine configuration: the same fields from the CLI or a JSON file.

Every parse error is a :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.machine.layout import DEBUG_EXIT_BASE, VIRTIO_MMIO_SLOTS, MiB

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}
MIN_MEMORY = 2 * MiB


def parse_size(text: str | int) -> int:
    """'64M', '1G', '512' (MiB, as QEMU's -m) -> bytes."""
    if isinstance(text, int):
        return text * MiB
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"memory size {text!r} is not a size (use e.g. 64M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_int(text: str | int, what: str) -> int:
    if isinstance(text, int):
        return text
    try:
        return int(str(text), 0)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number") from None


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


SERIAL_KINDS = ("stdio", "file", "socket", "none")


@dataclass
class NetConfig:
    tap: str = "auto"
    mac: str | None = None
    transport: str = "pci"

    @classmethod
    def parse(cls, spec: str | dict[str, Any]) -> NetConfig:
        """'tap=NAME|auto[,mac=52:54:00:..]' or the same as a JSON object."""
        items = ({str(k): str(v) for k, v in spec.items()} if isinstance(spec, dict) else
                 dict(p.partition("=")[::2] for p in str(spec).split(",")))
        unknown = set(items) - {"tap", "mac", "transport"}
        if unknown:
            raise ConfigError(f"net {spec!r}: unknown key {sorted(unknown)[0]!r}")
        mac = items.get("mac")
        if mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
            raise ConfigError(f"net {spec!r}: mac must look like 52:54:00:12:34:56")
        if mac is not None and int(mac[:2], 16) & 1:
            raise ConfigError(f"net {spec!r}: mac {mac} is a multicast address")
        transport = items.get("transport", "pci")
        if transport not in ("pci", "mmio"):
            raise ConfigError(f"net {spec!r}: transport must be pci or mmio")
        return cls(items.get("tap") or "auto", mac, transport)


@dataclass
class DiskConfig:
    path: str
    readonly: bool = False
    transport: str = "pci"
    interface: str = "virtio"  # or "nvme": full emulation (transport is then PCI)

    @classmethod
    def parse(cls, spec: str | dict[str, Any]) -> DiskConfig:
        """'path=IMG[,readonly=on][,transport=pci|mmio][,if=virtio|nvme]' or the same as
        a JSON object."""
        if isinstance(spec, dict):
            items = {str(k): str(v) for k, v in spec.items()}
        else:
            items = {}
            for part in str(spec).split(","):
                key, eq, val = part.partition("=")
                if not eq:
                    raise ConfigError(f"disk {spec!r}: expected key=value, got {part!r}")
                items[key.strip()] = val.strip()
        unknown = set(items) - {"path", "readonly", "transport", "if"}
        if unknown:
            raise ConfigError(f"disk {spec!r}: unknown key {sorted(unknown)[0]!r}")
        if not items.get("path"):
            raise ConfigError(f"disk {spec!r}: no path= given")
        ro = items.get("readonly", "off").lower()
        if ro not in ("on", "off", "true", "false"):
            raise ConfigError(f"disk {spec!r}: readonly must be on or off")
        transport = items.get("transport", "pci")
        if transport not in ("pci", "mmio"):
            raise ConfigError(f"disk {spec!r}: transport must be pci or mmio")
        interface = items.get("if", "virtio")
        if interface not in ("virtio", "nvme"):
            raise ConfigError(f"disk {spec!r}: if must be virtio or nvme")
        if interface == "nvme" and transport != "pci":
            raise ConfigError(f"disk {spec!r}: an NVMe controller is a PCI device "
                              "(no transport=mmio)")
        return cls(items["path"], ro in ("on", "true"), transport, interface)


@dataclass
class SerialConfig:
    kind: str = "stdio"
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> SerialConfig:
        kind, _, path = text.partition(":")
        if kind not in SERIAL_KINDS:
            raise ConfigError(
                f"serial {text!r}: use stdio, file:PATH, socket:PATH or none"
            )
        if kind in ("file", "socket") and not path:
            raise ConfigError(f"serial {text!r}: {kind} needs a path ({kind}:PATH)")
        if kind in ("stdio", "none") and path:
            raise ConfigError(f"serial {text!r}: {kind} takes no path")
        return cls(kind, path or None)


@dataclass
class MachineConfig:
    kernel: str
    memory: int = 64 * MiB
    cmdline: str = ""
    serial: SerialConfig = field(default_factory=SerialConfig)
    load_addr: int | None = None
    entry: int | None = None
    exits_json: str | None = None
    debug_exit_port: int = DEBUG_EXIT_BASE
    debug_exit_size: int = 4
    timeout: float | None = None
    quiet: bool = False
    pci_testdev: bool = True
    irqchip: str = "kernel"  # "kernel": KVM's PIC/IOAPIC/PIT; "split": Python's
    disks: list[DiskConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    console: SerialConfig | None = None  # virtio-console host end
    console_transport: str = "pci"
    rng: str | None = None  # None, "pci" or "mmio"
    rng_rate: int | None = None  # virtio-rng bytes per second (token bucket), None: unlimited
    msi: str = "irqfd"  # device MSI/MSI-X vectors: "irqfd" (per-vector GSI) or "signal"

    def validate(self) -> None:
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"memory {self.memory >> 20} MiB is too small (at least 2M)")
        if self.memory % (2 * MiB):
            raise ConfigError("memory must be a multiple of 2 MiB")
        hm = host_memory()
        if self.memory > hm:
            raise ConfigError(
                f"memory {self.memory >> 20} MiB is more than the host has ({hm >> 20} MiB)"
            )
        if not Path(self.kernel).is_file():
            what = "is a directory" if Path(self.kernel).is_dir() else "not found"
            raise ConfigError(f"kernel file {what}: {self.kernel}")
        if self.debug_exit_size not in (1, 2, 4):
            raise ConfigError("debug-exit size must be 1, 2 or 4")
        if not 0 <= self.debug_exit_port <= 0xFFFF - self.debug_exit_size + 1:
            raise ConfigError(f"debug-exit port {self.debug_exit_port:#x} is not a port")
        if len(self.cmdline.encode()) >= 4096:
            raise ConfigError("kernel command line is longer than 4095 bytes")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("timeout must be positive")
        if self.console is not None and self.console.kind == "stdio" == self.serial.kind:
            raise ConfigError("serial and console cannot both use stdio")
        mmio = (sum(d.transport == "mmio" for d in self.disks)
                + sum(n.transport == "mmio" for n in self.nets) + (self.rng == "mmio")
                + (self.console is not None and self.console_transport == "mmio"))
        if mmio > VIRTIO_MMIO_SLOTS:
            raise ConfigError(f"at most {VIRTIO_MMIO_SLOTS} virtio-mmio devices")
        for d in self.disks:
            if not Path(d.path).is_file():
                what = "is a directory" if Path(d.path).is_dir() else "not found"
                raise ConfigError(f"disk image {what}: {d.path}")

    @classmethod
    def from_json(cls, path: str, overrides: dict[str, Any] | None = None) -> MachineConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: invalid JSON at line {e.lineno}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be an object")
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> MachineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r}")
        if "kernel" not in raw:
            raise ConfigError(f"{source}: no kernel given")
        cfg = cls(kernel=str(raw["kernel"]))
        if "memory" in raw:
            cfg.memory = parse_size(raw["memory"])
        if "cmdline" in raw:
            cfg.cmdline = str(raw["cmdline"])
        if "serial" in raw:
            cfg.serial = SerialConfig.parse(str(raw["serial"]))
        for name in ("load_addr", "entry", "debug_exit_port", "debug_exit_size"):
            if raw.get(name) is not None:
                setattr(cfg, name, parse_int(raw[name], name.replace("_", "-")))
        if raw.get("exits_json") is not None:
            cfg.exits_json = str(raw["exits_json"])
        if raw.get("timeout") is not None:
            try:
                cfg.timeout = float(raw["timeout"])
            except (TypeError, ValueError):
                raise ConfigError(f"timeout {raw['timeout']!r} is not a number") from None
        if "quiet" in raw:
            cfg.quiet = bool(raw["quiet"])
        if raw.get("irqchip") is not None:
            if raw["irqchip"] not in ("kernel", "split"):
                raise ConfigError(f"irqchip {raw['irqchip']!r}: use kernel or split")
            cfg.irqchip = str(raw["irqchip"])
        if raw.get("disks") is not None:
            if not isinstance(raw["disks"], list):
                raise ConfigError(f"{source}: disks must be a list")
            cfg.disks = [DiskConfig.parse(d) for d in raw["disks"]]
        if raw.get("nets") is not None:
            if not isinstance(raw["nets"], list):
                raise ConfigError(f"{source}: nets must be a list")
            cfg.nets = [NetConfig.parse(n) for n in raw["nets"]]
        if raw.get("console") is not None:
            cfg.console = SerialConfig.parse(str(raw["console"]))
        if raw.get("rng") not in (None, False):
            rng = "pci" if raw["rng"] is True else str(raw["rng"])
            if rng not in ("pci", "mmio"):
                raise ConfigError(f"rng {raw['rng']!r}: use pci or mmio")
            cfg.rng = rng
        if raw.get("rng_rate") is not None:
            cfg.rng_rate = parse_int(raw["rng_rate"], "rng-rate")
            if cfg.rng_rate <= 0:
                raise ConfigError("rng-rate must be a positive number of bytes per second")
        if raw.get("msi") is not None:
            if raw["msi"] not in ("irqfd", "signal"):
                raise ConfigError(f"msi {raw['msi']!r}: use irqfd or signal")
            cfg.msi = str(raw["msi"])
        if raw.get("console_transport") is not None:
            if raw["console_transport"] not in ("pci", "mmio"):
                raise ConfigError("console transport must be pci or mmio")
            cfg.console_transport = str(raw["console_transport"])
        if "pci_testdev" in raw:
            cfg.pci_testdev = bool(raw["pci_testdev"])
        return cfg
