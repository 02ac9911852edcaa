"""The machine's configuration: one typed declaration that the command line, the JSON
config file, the JSON Schema and docs/config.md are all made from (``pyvmm.schema``).

Board options are fields of ``MachineConfig``; devices are ``DeviceEntry``s — a
registry spec and its typed config — in command-line order (which is PCI slot and
virtio-mmio slot order). In JSON::

    {"kernel": "guest.elf", "memory": "128M",
     "devices": [{"type": "virtio-blk", "path": "disk.img", "readonly": true},
                 {"type": "virtio-rng", "transport": "mmio"}]}

Every error is a :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm import schema
from pyvmm.backends.char import CharSpec
from pyvmm.devices.spec import DeviceConfig, DeviceSpec
from pyvmm.errors import ConfigError
from pyvmm.machine.layout import DEBUG_EXIT_BASE, MiB
from pyvmm.registry import DEVICES, find
from pyvmm.sandbox import SeccompMode
from pyvmm.schema import Size, option, parse_size

MIN_MEMORY = 2 * MiB
MAX_TIMEOUT = 10_000_000.0  # seconds: a longer one is a typo (and would overflow timers)
MAX_CONFIG_BYTES = 1 << 20


class IrqChipKind(enum.StrEnum):
    KERNEL = "kernel"  # KVM's PIC/IOAPIC/PIT
    SPLIT = "split"  # LAPIC in KVM, PIC/IOAPIC/PIT in Python


class MsiPath(enum.StrEnum):
    IRQFD = "irqfd"  # an irqfd and GSI route per vector
    SIGNAL = "signal"  # KVM_SIGNAL_MSI per message


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class DeviceEntry:
    spec: DeviceSpec
    config: DeviceConfig

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(kw_only=True)
class MachineConfig:
    kernel: str = option(doc="ELF (PVH note or 64-bit), multiboot v1, or flat image",
                         metavar="PATH")
    memory: Size = option(Size(64 * MiB), "guest RAM, e.g. 64M or 1G (a bare number is MiB)",
                          short="-m")
    cmdline: str = option("", "kernel command line")
    serial: str = option("stdio", "COM1's host end: stdio, file:PATH, socket:PATH or none",
                         metavar="stdio|file:PATH|socket:PATH|none")
    keyboard: str = option("none", "the PS/2 keyboard's host input: none, or stdin (terminal "
                           "keys as key presses; serial=stdio is then output only)",
                           metavar="none|stdin")
    load_addr: int | None = option(None, "load a flat binary here (forces the flat format)")
    entry: int | None = option(None, "entry address of a flat binary (default: load address)")
    exits_json: str | None = option(None, "write the per-device exit accounting as JSON here",
                                    metavar="PATH")
    debug_exit_port: int = option(DEBUG_EXIT_BASE, "the QEMU-compatible test-exit port; the "
                                  "VMM exits with (value << 1) | 1", hex=True)
    debug_exit_size: int = option(4, "test-exit port width: 1, 2 or 4")
    timeout: float | None = option(None, "stop the VM after this many seconds (exit code 124)")
    quiet: bool = option(False, "no exit table or notices", short="-q")
    pci_testdev: bool = option(True, "the PCI test device at 00:01.0 (DMA, INTx, MSI, MSI-X, "
                               "a shared-memory BAR)", cli="--no-pci-testdev")
    irqchip: IrqChipKind = option(IrqChipKind.KERNEL, "kernel: KVM's PIC/IOAPIC/PIT; split: "
                                  "LAPIC in KVM, PIC/IOAPIC/PIT in Python")
    msi: MsiPath = option(MsiPath.IRQFD, "device MSI/MSI-X: irqfd (an irqfd and GSI route per "
                          "vector) or signal (KVM_SIGNAL_MSI per message)")
    display: str | None = option(None, "write the display's screen as PNG: png:DIR[,every=S] "
                                 "(every S seconds when it changed, default 1, and at the "
                                 "stop); needs --device vga", metavar="png:DIR[,every=S]")
    seccomp: SeccompMode = option(SeccompMode.ENFORCE, "per-thread system-call allow-lists "
                                  "(vCPU, event loop, I/O pool): enforce refuses others with "
                                  "EPERM, log only logs them (docs/security.md)")
    api_socket: str | None = option(None, "serve the control API (HTTP/1.1, docs/api.md) on this "
                                    "Unix socket while the VM runs", metavar="PATH")
    web: str | None = option(None, "also serve the API and its live web page on this "
                             "loopback TCP address (needs api_socket; port 0: any free "
                             "port)", metavar="127.0.0.1:PORT")
    devices: list[DeviceEntry] = option(factory=list, doc="the machine's devices, in slot "
                                        "order", cli="")

    def check(self) -> None:
        """Rules between fields, and ranges (no file-system access: see ``validate``)."""
        if self.memory < MIN_MEMORY:
            raise ValueError(f"memory {self.memory >> 20} MiB is too small (at least 2M)")
        if self.memory % (2 * MiB):
            raise ValueError("memory must be a multiple of 2 MiB")
        if self.debug_exit_size not in (1, 2, 4):
            raise ValueError("debug_exit_size must be 1, 2 or 4")
        if not 0 <= self.debug_exit_port <= 0x10000 - self.debug_exit_size:
            raise ValueError(f"debug_exit_port {self.debug_exit_port:#x} is not a port")
        if len(self.cmdline.encode("utf-8", "surrogatepass")) >= 4096:
            raise ValueError("kernel command line is longer than 4095 bytes")
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds")
        for what in ("load_addr", "entry"):
            v = getattr(self, what)
            if v is not None and not 0 <= v < 1 << 64:
                raise ValueError(f"{what} {v:#x} is not an address")
        CharSpec.parse(self.serial)
        if self.keyboard not in ("none", "stdin"):
            raise ValueError(f"keyboard {self.keyboard!r}: use none or stdin")
        if self.web is not None:
            if self.api_socket is None:
                raise ValueError("web needs api_socket (the web page is the API's)")
            web_address(self.web)
        if self.display is not None:
            from pyvmm.machine.display import PngOutput

            PngOutput.parse(self.display)
        for d in self.devices:
            if (getattr(d.config, "backend", None) == "stdio" and self.serial == "stdio"):
                raise ValueError(f"serial and {d.name} cannot both use stdio")
            if getattr(d.config, "backend", None) == "stdio" and self.keyboard == "stdin":
                raise ValueError(f"keyboard and {d.name} cannot both use stdin")

    def validate(self) -> None:
        """``check`` plus what needs the host: the kernel file, the host's memory."""
        try:
            self.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        hm = host_memory()
        if self.memory > hm:
            raise ConfigError(f"memory {self.memory >> 20} MiB is more than the host has "
                              f"({hm >> 20} MiB)")
        _check_file("kernel", self.kernel)
        if self.display is not None:
            from pyvmm.machine.display import PngOutput

            PngOutput.parse(self.display).validate()
            if not any(d.name == "vga" for d in self.devices):
                raise ConfigError("display: the machine has no display (add --device vga)")
        if self.exits_json is not None:
            parent = Path(self.exits_json).parent
            if not parent.is_dir():
                raise ConfigError(f"exits-json {self.exits_json!r}: folder {str(parent)!r} "
                                  "does not exist")
        if self.api_socket is not None:
            parent = Path(self.api_socket).parent
            if not parent.is_dir():
                raise ConfigError(f"api-socket {self.api_socket!r}: folder {str(parent)!r} "
                                  "does not exist")
        for d in self.devices:
            host_check = getattr(d.config, "validate", None)
            if host_check is not None:
                try:
                    host_check()  # what needs the host (an image file that exists)
                except ValueError as e:
                    raise ConfigError(f"{d.name}: {e}") from None

    def of_type(self, name: str) -> list[DeviceConfig]:
        return [d.config for d in self.devices if d.name == name]

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str, overrides: dict[str, Any] | None = None,
                  registry: tuple[DeviceSpec, ...] = DEVICES) -> MachineConfig:
        raw = load_json_object(path, "config file")
        for k, v in (overrides or {}).items():
            if v is not None:
                raw[k] = v
        return cls.from_dict(raw, source=path, registry=registry)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", *, text: bool = False,
                  registry: tuple[DeviceSpec, ...] = DEVICES) -> MachineConfig:
        """From a JSON object (``text`` False) or from command-line strings (True)."""
        if "kernel" not in raw:
            raise ConfigError(f"{source}: no kernel given (use --kernel PATH or a "
                              "\"kernel\" field)")
        items = raw.get("devices", [])
        if not isinstance(items, list):
            raise ConfigError(f"{source}: devices must be a list")
        devices = [device_entry(item, f"{source}: devices[{i}]", registry, text=text)
                   for i, item in enumerate(items)]
        board = {k: v for k, v in raw.items() if k != "devices"}
        cfg = schema.build(cls, board, source, text=text)
        cfg.devices = devices
        try:
            cfg.check()  # again: the cross-field rules involve the devices
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg


def device_entry(item: object, where: str, registry: tuple[DeviceSpec, ...],
                 *, text: bool = False) -> DeviceEntry:
    """One ``{"type": NAME, ...}`` object."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be an object with a \"type\"")
    name = item.get("type")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: no \"type\" (one of {', '.join(s.name for s in registry)})")
    spec = find(name, registry)
    if spec is None:
        raise ConfigError(f"{where}: unknown device type {name!r}"
                          f"{schema.did_you_mean(name, [s.name for s in registry])}")
    body = {k: v for k, v in item.items() if k != "type"}
    return DeviceEntry(spec, schema.build(spec.config, body, f"{where} ({name})", text=text))


def web_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for ``web``, HOST a loopback address: the API can pause and stop
    the VM, so it is never offered to other machines."""
    import ipaddress

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"web {text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"web {text!r}: only a loopback address (127.0.0.1, ::1, "
                         "localhost): the API controls the VM")
    return host, int(port)


def load_json_object(path: str, what: str) -> dict[str, Any]:
    """A JSON object from a file, every way it can fail as one line."""
    if "\0" in path:
        raise ConfigError(f"{what} path contains a NUL byte")
    try:
        p = Path(path)
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, UnicodeError, ValueError) as e:
        raise ConfigError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}"
                          ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: invalid JSON at line {e.lineno}") from None
    except (RecursionError, ValueError) as e:  # nesting too deep, an integer too long
        raise ConfigError(f"{what} {path}: cannot be read as JSON ({type(e).__name__})"
                          ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: top level must be an object")
    return raw


def _check_file(what: str, path: str) -> None:
    try:
        p = Path(path)
        if p.is_file():
            return
        problem = "is a directory" if p.is_dir() else "not found"
    except (OSError, ValueError, UnicodeError) as e:
        problem = f"unusable ({getattr(e, 'strerror', None) or e})"
    raise ConfigError(f"{what} file {problem}: {path!r}")


def config_schema(registry: tuple[DeviceSpec, ...] = DEVICES) -> dict[str, Any]:
    """JSON Schema of the config file, made from the same declarations as the CLI."""
    devices = []
    for spec in registry:
        s = schema.json_schema(spec.config, title=spec.name,
                               extra={"type": {"const": spec.name, "description": spec.summary}})
        s["required"] = ["type", *s.get("required", [])]
        devices.append(s)
    top = schema.json_schema(MachineConfig, title="pyvmm machine configuration",
                             extra={"devices": {"type": "array", "description":
                                                "the machine's devices, in slot order",
                                                "items": {"oneOf": devices}}})
    top["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return top


__all__ = ["DeviceEntry", "IrqChipKind", "MachineConfig", "MsiPath", "Size", "config_schema",
           "parse_size"]
