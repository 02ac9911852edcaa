"""The e2e guest kit: a Debian kernel and a busybox initramfs whose /init loads the
virtio modules, runs a per-test script and prints ``TCG-TEST-RC=<rc>``.

Built from Debian packages (bookworm) into a cache directory
(``$PYVMM_E2E_CACHE`` or ``~/.cache/pyvmm-e2e``); it rebuilds from nothing on a fresh
machine and the cache only saves the ~10 s it takes. The kernel is booted as the
extracted ELF vmlinux through its PVH note (about half the time of the bzImage under
TCG, see shared/tcg-harness-notes.md).
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

# The kit carries drivers for every device class the e2e tests may meet: virtio, and
# the emulated NVMe, e1000 and IDE (ata_piix, with sd_mod for its disks) an unmodified
# guest would use.
MODULES = ["virtio_blk", "virtio_net", "virtio_pci", "virtio_console", "nvme", "e1000",
           "ata_piix", "sd_mod"]
XZ_MAGIC = b"\xfd7zXZ\x00"


def cache_dir() -> Path:
    d = Path(os.environ.get("PYVMM_E2E_CACHE") or Path.home() / ".cache" / "pyvmm-e2e")
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class Kit:
    vmlinux: Path
    modules: dict[str, bytes]  # name -> .ko contents, in load order
    busybox: Path


def _apt_download(names: list[str], into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    os.chmod(into, 0o777)  # apt drops to the _apt user for downloads
    missing = [n for n in names if not list(into.glob(f"{n}_*.deb"))]
    if missing:
        r = subprocess.run(["apt-get", "download", "-qq", *missing], cwd=into,
                           capture_output=True)
        if r.returncode != 0:  # stale or missing package lists: refresh once, retry
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(["apt-get", "download", "-qq", *missing], cwd=into, check=True,
                           capture_output=True)


def _kernel_package() -> str:
    r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                       text=True)
    if r.returncode != 0 or "linux-image-6" not in r.stdout:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                           text=True, check=True)
    out = r.stdout
    for line in out.splitlines():
        word = line.split()[-1]
        if line.strip().startswith("Depends:") and word.startswith("linux-image-6"):
            return word
    raise RuntimeError("cannot resolve the linux-image-amd64 kernel package")


def _deb_members(deb: Path, want: callable) -> dict[str, bytes]:  # type: ignore[valid-type]
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            if m.isfile() and want(m.name):
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF inside an xz-compressed bzImage (what scripts/extract-vmlinux does)."""
    pos = bzimage.find(XZ_MAGIC)
    while pos >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[pos:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        pos = bzimage.find(XZ_MAGIC, pos + 1)
    raise RuntimeError("no xz-compressed ELF found in the bzImage")


def _modinfo_depends(ko: bytes) -> list[str]:
    i = ko.find(b"depends=")
    if i < 0:
        return []
    val = ko[i + 8:ko.index(b"\0", i)].decode()
    return [d for d in val.split(",") if d]


def build() -> Kit:
    root = cache_dir()
    kdir = root / "kit"
    vmlinux, bb = kdir / "vmlinux", kdir / "busybox"
    mods_dir = kdir / "modules"
    order_file = kdir / "modules.order"
    if vmlinux.exists() and bb.exists() and order_file.exists():
        order = order_file.read_text().split()
        if set(MODULES) <= set(order):  # a cache from an older module list is rebuilt
            return Kit(vmlinux, {m: (mods_dir / f"{m}.ko").read_bytes() for m in order}, bb)
    kpkg = _kernel_package()
    debs = root / "debs"
    _apt_download([kpkg, "busybox-static"], debs)
    kdeb = next(debs.glob(f"{kpkg}_*.deb"))
    files = _deb_members(kdeb, lambda n: "/boot/vmlinuz-" in n or n.endswith(".ko")
                         or n.endswith("modules.builtin"))
    bz = next(v for k, v in files.items() if "/boot/vmlinuz-" in k)
    kos = {Path(k).name[:-3]: v for k, v in files.items() if k.endswith(".ko")}
    builtin = {Path(line).name[:-3] for k, v in files.items() if k.endswith("modules.builtin")
               for line in v.decode().split()}
    order: list[str] = []

    def add(name: str) -> None:
        name = name.replace("-", "_")
        if name in order or name in builtin:
            return
        ko = kos.get(name) or kos.get(name.replace("_", "-"))
        if ko is None:
            raise RuntimeError(f"module {name} not in {kdeb.name}")
        for dep in _modinfo_depends(ko):
            add(dep)
        order.append(name)

    for m in MODULES:
        add(m)
    tmp = root / "kit.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "modules").mkdir(parents=True)
    (tmp / "vmlinux").write_bytes(extract_vmlinux(bz))
    for m in order:
        (tmp / "modules" / f"{m}.ko").write_bytes(kos.get(m) or kos[m.replace("_", "-")])
    bbdeb = next(debs.glob("busybox-static_*.deb"))
    bbfiles = _deb_members(bbdeb, lambda n: n.endswith("/bin/busybox"))
    (tmp / "busybox").write_bytes(next(iter(bbfiles.values())))
    (tmp / "modules.order").write_text("\n".join(order) + "\n")
    shutil.rmtree(kdir, ignore_errors=True)
    tmp.rename(kdir)
    return build()


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
echo TCG-READY
sh /test.sh
echo TCG-TEST-RC=$?
sync
poweroff -f
"""


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    nm = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0))
    out = hdr.encode() + nm
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def initramfs(kit: Kit, test_script: str) -> bytes:
    """A newc cpio (no external tools) with busybox, the modules, /init and /test.sh."""
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules")]
    entries.append(("bin/busybox", 0o100755, kit.busybox.read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    entries.append(("test.sh", 0o100755, test_script.encode()))
    entries.append(("modules.order", 0o100644, "\n".join(kit.modules).encode()))
    for name, ko in kit.modules.items():
        entries.append((f"lib/modules/{name}.ko", 0o100644, ko))
    out = b"".join(_cpio_entry(n, m, d, i + 1) for i, (n, m, d) in enumerate(entries))
    return out + _cpio_entry("TRAILER!!!", 0, b"", 0)
