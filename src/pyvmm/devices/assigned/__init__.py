"""Devices (or parts of them) outside the VMM's trap path: memory shared with the
guest and mapped into it, so its accesses never exit."""
