"""Thin typed layer over the KVM ioctls: :class:`Kvm`, :class:`Vm`, :class:`Vcpu`."""

from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm

__all__ = ["Kvm", "Vcpu", "Vm"]
