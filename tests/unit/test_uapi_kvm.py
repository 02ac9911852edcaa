"""Every ioctl number, exit reason, capability, struct size and run-page offset in
pyvmm.uapi.kvm is checked against the host's <linux/kvm.h> through a C program."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.uapi import kvm as K

IOCTLS = [n for n in dir(K) if n.startswith("KVM_") and n.isupper() and isinstance(
    getattr(K, n), int) and not n.startswith(("KVM_RUN_", "KVM_EXIT_IO_", "KVM_MEM_",
                                               "KVM_IRQFD_FLAG", "KVM_IOEVENTFD_FLAG",
                                               "KVM_MP_STATE", "KVM_IRQ_ROUTING_",
                                               "KVM_IRQCHIP_", "KVM_PIT_", "KVM_APIC_",
                                               "KVM_NR_", "KVM_INTERNAL_", "KVM_SYSTEM_EVENT",
                                               "KVM_API_VERSION"))]
STRUCTS = ["kvm_regs", "kvm_sregs", "kvm_segment", "kvm_dtable", "kvm_fpu",
           "kvm_userspace_memory_region", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_msr_entry",
           "kvm_msrs", "kvm_lapic_state", "kvm_irq_level", "kvm_msi", "kvm_irqfd",
           "kvm_ioeventfd", "kvm_enable_cap", "kvm_pit_config", "kvm_irq_routing_entry",
           "kvm_irq_routing", "kvm_mp_state", "kvm_vcpu_events", "kvm_interrupt",
           "kvm_msr_list", "kvm_irqchip", "kvm_pic_state", "kvm_dirty_log",
           "kvm_clear_dirty_log"]
RUN_FIELDS = {
    "KVM_RUN_IMMEDIATE_EXIT": "immediate_exit", "KVM_RUN_EXIT_REASON": "exit_reason",
    "KVM_RUN_READY_FOR_INTERRUPT_INJECTION": "ready_for_interrupt_injection",
    "KVM_RUN_IF_FLAG": "if_flag", "KVM_RUN_IO_DIRECTION": "io.direction",
    "KVM_RUN_IO_SIZE": "io.size", "KVM_RUN_IO_PORT": "io.port", "KVM_RUN_IO_COUNT": "io.count",
    "KVM_RUN_IO_DATA_OFFSET": "io.data_offset", "KVM_RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "KVM_RUN_MMIO_DATA": "mmio.data", "KVM_RUN_MMIO_LEN": "mmio.len",
    "KVM_RUN_MMIO_IS_WRITE": "mmio.is_write", "KVM_RUN_INTERNAL_SUBERROR": "internal.suberror",
    "KVM_RUN_INTERNAL_NDATA": "internal.ndata", "KVM_RUN_INTERNAL_DATA": "internal.data",
    "KVM_RUN_SYSTEM_EVENT_TYPE": "system_event.type", "KVM_RUN_EOI_VECTOR": "eoi.vector",
}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not shutil.which("gcc") or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or <linux/kvm.h> (linux-libc-dev) is not installed")
    d = tmp_path_factory.mktemp("uapi")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void){"]
    for n in IOCTLS:
        lines.append(f'printf("{n} %lu\\n", (unsigned long)({n}));')
    for s in STRUCTS:
        lines.append(f'printf("sizeof_{s} %zu\\n", sizeof(struct {s}));')
    for name, fld in RUN_FIELDS.items():
        lines.append(f'printf("{name} %zu\\n", offsetof(struct kvm_run, {fld}));')
    lines.append('printf("KVM_RUN_SIZE %zu\\n", sizeof(struct kvm_run));')
    lines.append("return 0;}")
    (d / "t.c").write_text("\n".join(lines))
    subprocess.run(["gcc", str(d / "t.c"), "-o", str(d / "t")], check=True)
    out = subprocess.run([str(d / "t")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_ioctl_numbers_and_constants_match_header(header_values: dict[str, int]) -> None:
    assert len(IOCTLS) > 60
    mismatched = {n: (getattr(K, n), header_values[n]) for n in IOCTLS
                  if getattr(K, n) != header_values[n]}
    assert not mismatched


def test_struct_sizes_match_header(header_values: dict[str, int]) -> None:
    for s in STRUCTS:
        assert ctypes.sizeof(getattr(K, s)) == header_values[f"sizeof_{s}"], s


def test_run_page_offsets_match_header(header_values: dict[str, int]) -> None:
    for name in [*RUN_FIELDS, "KVM_RUN_SIZE"]:
        assert getattr(K, name) == header_values[name], name
