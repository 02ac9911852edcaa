"""``<linux/kvm.h>`` for x86-64: ioctl numbers, exit reasons, capabilities, structures.

Only what pyvmm uses is here. ``tests/unit/test_uapi_kvm.py`` compiles a C program
against the host's header and checks every number and size below against it.
"""

from __future__ import annotations

import ctypes as C

from pyvmm.uapi.ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

# --- exit reasons -----------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# --- capabilities -----------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168

CAP_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_CAP_")}


# --- structures -------------------------------------------------------------------------
class kvm_regs(C.Structure):
    _fields_ = [
        (n, C.c_uint64)
        for n in (
            [
                "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
            ]
        )
    ]


class kvm_segment(C.Structure):
    _fields_ = [
        ("base", C.c_uint64),
        ("limit", C.c_uint32),
        ("selector", C.c_uint16),
        ("type", C.c_uint8),
        ("present", C.c_uint8),
        ("dpl", C.c_uint8),
        ("db", C.c_uint8),
        ("s", C.c_uint8),
        ("l", C.c_uint8),
        ("g", C.c_uint8),
        ("avl", C.c_uint8),
        ("unusable", C.c_uint8),
        ("padding", C.c_uint8),
    ]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(C.Structure):
    _fields_ = [
        *((n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((n, C.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", C.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(C.Structure):
    _fields_ = [
        ("fpr", (C.c_uint8 * 16) * 8),
        ("fcw", C.c_uint16),
        ("fsw", C.c_uint16),
        ("ftwx", C.c_uint8),
        ("pad1", C.c_uint8),
        ("last_opcode", C.c_uint16),
        ("last_ip", C.c_uint64),
        ("last_dp", C.c_uint64),
        ("xmm", (C.c_uint8 * 16) * 16),
        ("mxcsr", C.c_uint32),
        ("pad2", C.c_uint32),
    ]


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32),
        ("flags", C.c_uint32),
        ("guest_phys_addr", C.c_uint64),
        ("memory_size", C.c_uint64),
        ("userspace_addr", C.c_uint64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_dirty_log(C.Structure):
    # The union { void *dirty_bitmap; __u64 padding2; } as its u64: the bitmap's address.
    _fields_ = [
        ("slot", C.c_uint32),
        ("padding1", C.c_uint32),
        ("dirty_bitmap", C.c_uint64),
    ]


class kvm_clear_dirty_log(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32),
        ("num_pages", C.c_uint32),
        ("first_page", C.c_uint64),
        ("dirty_bitmap", C.c_uint64),
    ]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [
        ("function", C.c_uint32),
        ("index", C.c_uint32),
        ("flags", C.c_uint32),
        ("eax", C.c_uint32),
        ("ebx", C.c_uint32),
        ("ecx", C.c_uint32),
        ("edx", C.c_uint32),
        ("padding", C.c_uint32 * 3),
    ]


class kvm_cpuid2(C.Structure):
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]  # + entries[nent]


def kvm_cpuid2_with(n: int) -> type[C.Structure]:
    """A ``kvm_cpuid2`` with room for ``n`` entries (the flexible array made concrete)."""

    class _Cpuid(C.Structure):
        _fields_ = [
            ("nent", C.c_uint32),
            ("padding", C.c_uint32),
            ("entries", kvm_cpuid_entry2 * n),
        ]

    return _Cpuid


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


class kvm_msrs(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]  # + entries[nmsrs]


def kvm_msrs_with(n: int) -> type[C.Structure]:
    class _Msrs(C.Structure):
        _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32), ("entries", kvm_msr_entry * n)]

    return _Msrs


class kvm_msr_list(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32)]  # + indices[nmsrs]


def kvm_msr_list_with(n: int) -> type[C.Structure]:
    class _MsrList(C.Structure):
        _fields_ = [("nmsrs", C.c_uint32), ("indices", C.c_uint32 * n)]

    return _MsrList


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", C.c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_irq_level(C.Structure):
    _fields_ = [("irq", C.c_uint32), ("level", C.c_uint32)]


class kvm_msi(C.Structure):
    _fields_ = [
        ("address_lo", C.c_uint32),
        ("address_hi", C.c_uint32),
        ("data", C.c_uint32),
        ("flags", C.c_uint32),
        ("devid", C.c_uint32),
        ("pad", C.c_uint8 * 12),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irqfd(C.Structure):
    _fields_ = [
        ("fd", C.c_uint32),
        ("gsi", C.c_uint32),
        ("flags", C.c_uint32),
        ("resamplefd", C.c_uint32),
        ("pad", C.c_uint8 * 16),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_ioeventfd(C.Structure):
    _fields_ = [
        ("datamatch", C.c_uint64),
        ("addr", C.c_uint64),
        ("len", C.c_uint32),
        ("fd", C.c_int32),
        ("flags", C.c_uint32),
        ("pad", C.c_uint8 * 36),
    ]


class kvm_enable_cap(C.Structure):
    _fields_ = [
        ("cap", C.c_uint32),
        ("flags", C.c_uint32),
        ("args", C.c_uint64 * 4),
        ("pad", C.c_uint8 * 64),
    ]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_pit_config(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("pad", C.c_uint32 * 15)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irq_routing_irqchip(C.Structure):
    _fields_ = [("irqchip", C.c_uint32), ("pin", C.c_uint32)]


class kvm_irq_routing_msi(C.Structure):
    _fields_ = [
        ("address_lo", C.c_uint32),
        ("address_hi", C.c_uint32),
        ("data", C.c_uint32),
        ("devid", C.c_uint32),
    ]


class _kvm_irq_routing_u(C.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", C.c_uint32 * 8),
    ]


class kvm_irq_routing_entry(C.Structure):
    _fields_ = [
        ("gsi", C.c_uint32),
        ("type", C.c_uint32),
        ("flags", C.c_uint32),
        ("pad", C.c_uint32),
        ("u", _kvm_irq_routing_u),
    ]


class kvm_irq_routing(C.Structure):
    _fields_ = [("nr", C.c_uint32), ("flags", C.c_uint32)]  # + entries[nr]


def kvm_irq_routing_with(n: int) -> type[C.Structure]:
    class _Routing(C.Structure):
        _fields_ = [
            ("nr", C.c_uint32),
            ("flags", C.c_uint32),
            ("entries", kvm_irq_routing_entry * n),
        ]

    return _Routing


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_mp_state(C.Structure):
    _fields_ = [("mp_state", C.c_uint32)]


class kvm_interrupt(C.Structure):
    _fields_ = [("irq", C.c_uint32)]


class _ev_exception(C.Structure):
    _fields_ = [
        ("injected", C.c_uint8),
        ("nr", C.c_uint8),
        ("has_error_code", C.c_uint8),
        ("pending", C.c_uint8),
        ("error_code", C.c_uint32),
    ]


class _ev_interrupt(C.Structure):
    _fields_ = [
        ("injected", C.c_uint8),
        ("nr", C.c_uint8),
        ("soft", C.c_uint8),
        ("shadow", C.c_uint8),
    ]


class _ev_nmi(C.Structure):
    _fields_ = [
        ("injected", C.c_uint8),
        ("pending", C.c_uint8),
        ("masked", C.c_uint8),
        ("pad", C.c_uint8),
    ]


class _ev_smi(C.Structure):
    _fields_ = [
        ("smm", C.c_uint8),
        ("pending", C.c_uint8),
        ("smm_inside_nmi", C.c_uint8),
        ("latched_init", C.c_uint8),
    ]


class kvm_vcpu_events(C.Structure):
    _fields_ = [
        ("exception", _ev_exception),
        ("interrupt", _ev_interrupt),
        ("nmi", _ev_nmi),
        ("sipi_vector", C.c_uint32),
        ("flags", C.c_uint32),
        ("smi", _ev_smi),
        ("triple_fault_pending", C.c_uint8),
        ("reserved", C.c_uint8 * 26),
        ("exception_has_payload", C.c_uint8),
        ("exception_payload", C.c_uint64),
    ]


class kvm_pic_state(C.Structure):
    _fields_ = [(n, C.c_uint8) for n in (
        [
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        ]
    )]


class kvm_irqchip(C.Structure):
    _fields_ = [
        ("chip_id", C.c_uint32),
        ("pad", C.c_uint32),
        ("chip", C.c_uint8 * 512),
    ]


# --- struct kvm_run: fixed offsets of the fields pyvmm reads from the mmap -------------
# Read through a memoryview on the hot path rather than a ctypes Structure, which is
# slower per field access.
KVM_RUN_REQUEST_INTERRUPT_WINDOW = 0
KVM_RUN_IMMEDIATE_EXIT = 1
KVM_RUN_EXIT_REASON = 8
KVM_RUN_READY_FOR_INTERRUPT_INJECTION = 12
KVM_RUN_IF_FLAG = 13
KVM_RUN_FLAGS = 14
KVM_RUN_CR8 = 16
KVM_RUN_APIC_BASE = 24
KVM_RUN_EXIT_UNION = 32  # io / mmio / internal / system_event / eoi
KVM_RUN_IO_DIRECTION = 32
KVM_RUN_IO_SIZE = 33
KVM_RUN_IO_PORT = 34
KVM_RUN_IO_COUNT = 36
KVM_RUN_IO_DATA_OFFSET = 40
KVM_RUN_MMIO_PHYS_ADDR = 32
KVM_RUN_MMIO_DATA = 40
KVM_RUN_MMIO_LEN = 48
KVM_RUN_MMIO_IS_WRITE = 52
KVM_RUN_INTERNAL_SUBERROR = 32
KVM_RUN_INTERNAL_NDATA = 36
KVM_RUN_INTERNAL_DATA = 40
KVM_RUN_SYSTEM_EVENT_TYPE = 32
KVM_RUN_SYSTEM_EVENT_NDATA = 36
KVM_RUN_EOI_VECTOR = 32
KVM_RUN_FAIL_ENTRY_REASON = 32
KVM_RUN_SIZE = 2352

# --- ioctls -----------------------------------------------------------------------------
# system
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# vm
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
# vcpu
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, kvm_interrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
