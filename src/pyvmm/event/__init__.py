"""The event loop for device work and host I/O (epoll)."""

from pyvmm.event.manager import EventManager

__all__ = ["EventManager"]
