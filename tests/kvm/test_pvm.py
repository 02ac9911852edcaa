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


def test_pvm_notice_shown_once(guests: Path) -> None:
    p = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "hello.elf")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    expected = 1 if Kvm.is_pvm() else 0
    assert p.stderr.count("KVM-PVM") == expected
