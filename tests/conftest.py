"""Shared fixtures: the tiny guests are built once per session with gcc/ld."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def pyvmm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", *args]
