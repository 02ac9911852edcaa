"""pyvmm: a KVM VMM in Python whose subject is I/O virtualization."""
__version__ = "0.1.0"
