"""PVM detection: the notice is shown once, and the probe passes on a PVM host."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyvmm import pvm
from pyvmm.kvm import Kvm
from tests.conftest import pyvmm_cmd


def test_probe_passes_on_this_host() -> None:
    with Kvm() as kvm:
        if not kvm.is_pvm():
            pytest.skip("not a KVM-PVM host: the probe only runs there")
        assert pvm.run_probe(kvm) == []


def test_pvm_notice_shown_once_at_info(guests: Path, tmp_path: Path) -> None:
    """The notice is INFO: not on every run (-v shows it, once), and --log-file takes it."""
    expected = 1 if Kvm.is_pvm() else 0
    quiet = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "hello.elf")),
                           capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and "KVM-PVM" not in quiet.stderr
    p = subprocess.run(pyvmm_cmd("-v", "run", "--kernel", str(guests / "hello.elf")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert p.stderr.count("KVM-PVM") == expected
    log = tmp_path / "pyvmm.log"
    p = subprocess.run(pyvmm_cmd("--log-level", "info", "--log-file", str(log), "run",
                                 "--kernel", str(guests / "hello.elf")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "KVM-PVM" not in p.stderr
    assert log.read_text().count("KVM-PVM") == expected
