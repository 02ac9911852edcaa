"""Legacy IDE/ATA: a PIIX3 IDE function with ATA disks (see controller.py)."""
