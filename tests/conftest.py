"""Shared fixtures: the tiny guests are built once per session with gcc/ld."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS_SRC = ROOT / "guests"


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with every guest as NAME.elf / NAME.bin / NAME.mb."""
    out = tmp_path_factory.mktemp("guests")
    subprocess.run(["make", "-s", "-C", str(GUESTS_SRC), f"OUT={out}"], check=True)
    return out


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened, else the reason."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_usable()
    qemu = shutil.which("qemu-system-x86_64")
    for item in items:
        if reason and "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
        if not qemu and "qemu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 is not installed"))


def wait_for_path(path: Path, timeout: float = 30) -> bool:
    """Wait for a server to create its socket (or any file); True if it appeared."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


def pyvmm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", *args]


@pytest.fixture
def tap() -> Iterator[str]:
    """A TAP device created for one test (no address, IPv6 off, MTU 9000), deleted after."""
    if not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("no /dev/net/tun or iproute2 on this machine")
    name = f"pvt{os.getpid() % 100000}"
    r = subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create a TAP here: {r.stderr.decode().strip()}")
    try:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False,
                       capture_output=True)
        subprocess.run(["ip", "link", "set", name, "mtu", "9000", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
