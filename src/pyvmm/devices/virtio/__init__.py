"""Virtio 1.2: the transport-independent core, split virtqueues, devices, transports."""
