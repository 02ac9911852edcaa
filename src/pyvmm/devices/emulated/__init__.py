"""Full-emulation devices of real hardware that need no family package of their own."""
