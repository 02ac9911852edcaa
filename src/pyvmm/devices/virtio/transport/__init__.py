"""Virtio transports: PCI (modern) and MMIO (version 2). A device never knows which."""
