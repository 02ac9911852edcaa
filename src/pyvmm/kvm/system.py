"""/dev/kvm: API version, capabilities, supported CPUID and MSRs, VM creation."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from pyvmm.errors import KvmError, KvmUnavailable
from pyvmm.kvm.ioctl import ioctl, ioctl_ptr
from pyvmm.uapi import kvm as K

DEV_KVM = "/dev/kvm"
PVM_MODULE = Path("/sys/module/kvm_pvm")


class Kvm:
    """An open /dev/kvm. One per process is enough; VMs share it."""

    def __init__(self, path: str | None = None) -> None:
        path = path or DEV_KVM
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: KVM is not available on this host"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: run as root or join the 'kvm' group"
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        version = ioctl(self.fd, K.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != K.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version}, pyvmm needs {K.KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE, 0, "GET_VCPU_MMAP_SIZE")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def require(self, caps: Iterable[int]) -> None:
        """Fail up front, naming every capability this host lacks."""
        missing = [K.CAP_NAMES.get(c, str(c)) for c in caps if self.check_extension(c) <= 0]
        if missing:
            raise KvmUnavailable(f"KVM lacks required capabilities: {', '.join(missing)}")

    @staticmethod
    def is_pvm() -> bool:
        """True when /dev/kvm is provided by the KVM-PVM module (no VT-x/AMD-V)."""
        return PVM_MODULE.is_dir()

    def supported_cpuid(self) -> ctypes.Structure:
        n = 64
        while True:
            cpuid = K.kvm_cpuid2_with(n)()
            cpuid.nent = n
            try:
                ioctl_ptr(self.fd, K.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
                return cpuid
            except KvmError as e:
                if e.errno != errno.E2BIG or n > 4096:
                    raise
                n *= 2

    def msr_index_list(self) -> list[int]:
        n = 64
        while True:
            lst = K.kvm_msr_list_with(n)()
            lst.nmsrs = n
            try:
                ioctl_ptr(self.fd, K.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
                return list(lst.indices[: lst.nmsrs])
            except KvmError as e:
                if e.errno != errno.E2BIG or n > 65536:
                    raise
                n = max(n * 2, lst.nmsrs)

    def create_vm(self) -> int:
        """Returns a raw VM fd; wrap it in :class:`pyvmm.kvm.Vm`."""
        return ioctl(self.fd, K.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
