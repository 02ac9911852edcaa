"""Input devices behind a controller port: the PS/2 keyboard and mouse.

Kept apart from the i8042 (``devices/legacy/i8042.py``) as on real hardware, where the
keyboard and the mouse are separate devices with their own command sets and buffers
on a serial link to the controller (QEMU splits them the same way: ``hw/input/ps2.c``
and ``hw/input/pckbd.c``).
"""
