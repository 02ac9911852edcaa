"""Display devices: the QEMU std-VGA-compatible ``vga`` (VGA text mode, Bochs VBE DISPI,
a dirty-logged linear framebuffer) and its renderer."""
