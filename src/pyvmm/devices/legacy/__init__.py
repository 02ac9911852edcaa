"""The fixed-port PC devices: one chip a file."""
