"""One root error for everything pyvmm raises on purpose.

    PyvmmError
    ├── ConfigError          bad host input: CLI, config file, image (one-line message)
    ├── KvmError             an ioctl failed (names the ioctl and errno)
    │   └── KvmUnavailable   no /dev/kvm, no permission, missing capability
    ├── PvmProbeError        the PVM behaviours the tiny-guest runtime relies on differ
    ├── GuestMemoryError     a guest-physical access outside RAM (a device fails the request)
    ├── BusError             overlapping or unknown bus ranges (a VMM bug, not a guest one)
    ├── LoaderError          the kernel image cannot be loaded (a ConfigError)
    ├── BackendError         a device's backend in another process (vhost-user) broke the
    │                        protocol, did not answer in time, or went away
    └── StateError           a call in the wrong lifecycle state
"""

from __future__ import annotations


class PyvmmError(Exception):
    """Root of pyvmm's own errors."""


class ConfigError(PyvmmError):
    """Bad host input; the message is one line meant for the user."""


class KvmError(PyvmmError, OSError):
    """An ioctl on /dev/kvm or a VM/vCPU fd failed."""

    def __init__(self, what: str, errno_: int) -> None:
        import os

        OSError.__init__(self, errno_, f"{what}: {os.strerror(errno_)}")
        self.what = what


class KvmUnavailable(PyvmmError):
    """KVM cannot be used here: the message says why in one line."""


class PvmProbeError(PyvmmError):
    """The start-up probe found PVM behaving differently from what the runtime needs."""


class GuestMemoryError(PyvmmError):
    """A guest-physical range is not backed by guest RAM."""


class BusError(PyvmmError):
    """A bus range overlaps another or is not present."""


class LoaderError(ConfigError):
    """The kernel image is not something pyvmm can load."""


class BackendError(PyvmmError):
    """The process serving a device's queues (a vhost-user backend) sent something the
    protocol does not allow, did not answer within its time, or closed the connection.
    The device needs a reset; it is not a VMM bug and not the guest's fault."""


class StateError(PyvmmError):
    """An operation was called in a lifecycle state that does not allow it."""

    def __init__(self, state: object, required: object) -> None:
        super().__init__(f"in state {state}, needs {required}")
        self.state = state
        self.required = required


# pyvmm run's exit codes. A guest's debug-exit write of v ends the run with (v << 1) | 1,
# QEMU's isa-debug-exit convention, so every odd code may be the guest's; pyvmm's own
# are even (README, "Exit codes"). 124/130 follow timeout(1) and the shell; SIGTERM's
# 143 (128 + 15) is kept by convention although a guest can write 71 for it.
EXIT_GUEST_STOPPED = 0  # reset, halt, or stopped through the control API
EXIT_CONFIG = 2  # bad option, config, image or host resource: one line
EXIT_KVM = 6  # /dev/kvm unusable, or a KVM call the machine needs failed
EXIT_GUEST_FAULT = 8  # the guest crashed the vCPU: triple fault, KVM internal error
EXIT_INTERNAL = 10  # a pyvmm bug, contained and reported
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
