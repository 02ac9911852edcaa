"""Host-side I/O behind narrow protocols. Never imports pyvmm.kvm."""
