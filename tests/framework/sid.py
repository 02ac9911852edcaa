"""QEMU 11 from Debian sid, for ``vfio-user-pci`` (bookworm's QEMU 7.2 lacks it).

A minbase sid tree with qemu-system-x86 is debootstrapped into the e2e cache from the
mirror the host's own apt sources name (read at run time; ~45 s cold, then cached).
QEMU runs chrooted inside a private mount namespace (``unshare -m``): /proc, /dev and
the test's work directory are bind-mounted there, and every mount vanishes with the
namespace, so nothing needs unmounting afterwards. Running the sid binary through its
own loader without a chroot does not work: it loads the host QEMU's modules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.framework.kit import cache_dir


def host_mirror() -> str:
    """The Debian mirror URI from the host's apt configuration."""
    for f in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in f.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    lst = Path("/etc/apt/sources.list")
    if lst.exists():
        for line in lst.read_text().splitlines():
            m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    raise RuntimeError("no Debian mirror found in the host's apt sources")


def sid_root() -> Path:
    root = cache_dir() / "sid"
    if (root / "usr/bin/qemu-system-x86_64").exists():
        return root
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap is not installed")
    tmp = cache_dir() / "sid.build"
    shutil.rmtree(tmp, ignore_errors=True)
    dcache = cache_dir() / "debootstrap-cache"
    dcache.mkdir(exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", "--include=qemu-system-x86",
                    f"--cache-dir={dcache}", "sid", str(tmp), host_mirror()],
                   check=True, capture_output=True, timeout=900)
    (tmp / "wd").mkdir(exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def _sid_command(workdir: Path, args: list[str]) -> list[str]:
    root = sid_root()
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    script = (f"mount --bind '{workdir}' '{root}/wd' && mount -t proc proc '{root}/proc' && "
              f"mount --rbind /dev '{root}/dev' && exec chroot '{root}' "
              f"qemu-system-x86_64 {quoted}")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]


def qemu_in_sid(workdir: Path, args: list[str],
                timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run sid's qemu-system-x86_64 with ``workdir`` visible as /wd."""
    return subprocess.run(_sid_command(workdir, args), capture_output=True, timeout=timeout)


def qemu_in_sid_popen(workdir: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """The same, started in the background (stdout and stderr together)."""
    return subprocess.Popen(_sid_command(workdir, args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def vfio_user_linux_args(socket_in_wd: str = "/wd/vfu.sock", append: str = "") -> list[str]:
    """QEMU arguments booting the kit from /wd with one vfio-user-pci device; ``append``
    adds to the kernel command line."""
    return ["-accel", "tcg", "-M", "q35,memory-backend=mem", "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on", "-m", "256M", "-nodefaults",
            "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", "/wd/vmlinux", "-initrd", "/wd/initrd.cpio",
            "-append", f"console=ttyS0 panic=-1 quiet {append}".strip(), "-device",
            '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"' + socket_in_wd + '"}}']


def prepare_guest(workdir: Path, scripts: dict[str, str]) -> None:
    """Skip unless the sid tree can be built here; put the kit's vmlinux and one
    initramfs per ``{name: script}`` (``name``.cpio) into ``workdir`` (seen as /wd)."""
    import pytest

    from tests.framework import kit

    if not shutil.which("debootstrap") or not shutil.which("unshare"):
        pytest.skip("debootstrap or unshare is not installed")
    k = kit.build()
    shutil.copy(k.vmlinux, workdir / "vmlinux")
    for name, script in scripts.items():
        (workdir / f"{name}.cpio").write_bytes(kit.initramfs(k, script))


def linux_with_vfio_user(workdir: Path, device: list[str], timeout: int = 240
                         ) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Serve ``pyvmm backend vfio-user <device...> --socket workdir/vfu.sock`` from its own
    process, boot the kit in ``workdir`` (see ``prepare_guest``) with one vfio-user-pci
    device on it, stop the server. Returns QEMU's result and the server's stderr."""
    import sys
    import time

    sock = workdir / "vfu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "vfio-user", *device,
                             "--socket", str(sock)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = qemu_in_sid(workdir, vfio_user_linux_args(), timeout=timeout)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    return r, err
