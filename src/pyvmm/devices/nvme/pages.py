"""The data structures NVMe admin commands return: Identify (§5.15) and log pages
(§5.14), as 4 KiB / 512-byte byte strings at the spec's offsets."""

from __future__ import annotations

import struct

from pyvmm.uapi import nvme as N

VERSION = 0x00010200  # 1.2: what VS reports and Identify's VER repeats
FIRMWARE = b"1.0"


def identify_controller(serial: str, vendor: int, mdts: int, aerl: int) -> bytes:
    page = bytearray(4096)
    struct.pack_into("<HH20s40s8s", page, 0, vendor, vendor, serial.encode()[:20].ljust(20),
                     b"pyvmm NVMe".ljust(40), FIRMWARE.ljust(8))
    page[77] = mdts
    struct.pack_into("<I", page, 80, VERSION)
    page[258], page[259] = 3, aerl  # ACL, AERL (0-based)
    page[512], page[513] = 0x66, 0x44  # SQES, CQES: 64- and 16-byte entries
    struct.pack_into("<I", page, 516, 1)  # NN: one namespace
    struct.pack_into("<H", page, 520, N.NVME_CTRL_ONCS_DSM | N.NVME_CTRL_ONCS_WRITE_ZEROES)
    page[525] = N.NVME_CTRL_VWC_PRESENT
    nqn = f"nqn.2026-12.io.pyvmm:nvme:{serial}".encode()[:255]
    page[768:768 + len(nqn)] = nqn
    return bytes(page)


def identify_namespace(nsze: int, lba_shift: int) -> bytes:
    page = bytearray(4096)
    struct.pack_into("<QQQ", page, 0, nsze, nsze, nsze)  # size, capacity, utilisation
    page[33] = 1  # DLFEAT: deallocated blocks read as zeroes
    struct.pack_into("<I", page, 128, lba_shift << 16)  # LBAF0: no metadata
    return bytes(page)


def active_namespaces(after: int) -> bytes:
    """The active NSIDs greater than ``after``: just 1."""
    page = bytearray(4096)
    if after < 1:
        struct.pack_into("<I", page, 0, 1)
    return bytes(page)


def log_page(lid: int) -> bytes | None:
    if lid == 0x01:  # error information: no errors
        return bytes(64)
    if lid == 0x02:  # SMART / health: 300 K, 100% spare, threshold 10%, nothing counted
        buf = bytearray(512)
        struct.pack_into("<BHBB", buf, 0, 0, 300, 100, 10)
        return bytes(buf)
    if lid == 0x03:  # firmware slots: slot 1 active with our revision
        buf = bytearray(512)
        buf[0] = 1
        buf[8:16] = FIRMWARE.ljust(8)
        return bytes(buf)
    return None
