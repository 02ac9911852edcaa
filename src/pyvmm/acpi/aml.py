"""Just enough AML (ACPI 6.5 §20) to describe devices: names, scopes, devices,
integers, strings, EISA IDs, buffers and resource templates (§6.4)."""

from __future__ import annotations

import struct

ZERO_OP, ONE_OP = 0x00, 0x01
NAME_OP, SCOPE_OP, BUFFER_OP = 0x08, 0x10, 0x11
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F


def pkg_length(body_len: int) -> bytes:
    """PkgLength counts itself: one byte up to 63, else 2-4 bytes (§20.2.4)."""
    for n in range(1, 5):
        total = body_len + n
        if n == 1 and total < 0x40:
            return bytes([total])
        if n > 1 and total < (1 << (4 + 8 * (n - 1))):
            out = [((n - 1) << 6) | (total & 0xF)]
            total >>= 4
            for _ in range(n - 1):
                out.append(total & 0xFF)
                total >>= 8
            return bytes(out)
    raise ValueError("AML package too large")


def name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    out = b""
    if path.startswith("\\"):
        out, path = bytes([ROOT_CHAR]), path[1:]
    segs = [s for s in path.split(".") if s]
    if len(segs) == 1:
        return out + name_seg(segs[0])
    if len(segs) == 2:
        return out + bytes([DUAL_NAME_PREFIX]) + b"".join(map(name_seg, segs))
    return out + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(map(name_seg, segs))


def integer(v: int) -> bytes:
    if v == 0:
        return bytes([ZERO_OP])
    if v == 1:
        return bytes([ONE_OP])
    if v <= 0xFF:
        return bytes([BYTE_PREFIX, v])
    if v <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", v)
    if v <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


def string(s: str) -> bytes:
    return bytes([STRING_PREFIX]) + s.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A08"): three 5-bit letters and four hex digits, big-endian."""
    c = [ord(ch) - 0x40 for ch in text[:3]]
    v = (c[0] << 26) | (c[1] << 21) | (c[2] << 16) | int(text[3:], 16)
    return integer(int.from_bytes(v.to_bytes(4, "big"), "little"))


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *body: bytes) -> bytes:
    inner = name_string(path) + b"".join(body)
    return bytes([SCOPE_OP]) + pkg_length(len(inner)) + inner


def device(path: str, *body: bytes) -> bytes:
    inner = name_string(path) + b"".join(body)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(inner)) + inner


def buffer(data: bytes) -> bytes:
    inner = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(inner)) + inner


# --- resource descriptors (§6.4) --------------------------------------------------------
def io_port(base: int, length: int) -> bytes:
    """I/O Port Descriptor, 16-bit decode, fixed base."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def irq_no_flags(*irqs: int) -> bytes:
    mask = 0
    for i in irqs:
        mask |= 1 << i
    return struct.pack("<BH", 0x22, mask)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def word_bus_number(lo: int, hi: int) -> bytes:
    # type 2 (bus), general flags: MinFixed|MaxFixed (0x0C), producer
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, lo, hi, 0, hi - lo + 1)


def word_io(lo: int, hi: int) -> bytes:
    # type 1 (I/O), MinFixed|MaxFixed, type-specific 3: ISA and non-ISA ranges
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 1, 0x0C, 3, 0, lo, hi, 0, hi - lo + 1)


def dword_memory(lo: int, hi: int) -> bytes:
    # type 0 (memory), MinFixed|MaxFixed, type-specific: read/write, non-cacheable
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x01, 0, lo, hi, 0, hi - lo + 1)


def extended_interrupt(*gsis: int, level: bool = False) -> bytes:
    # flags: consumer (bit 0), edge/level (bit 1), active-high (bit 2 = 0), exclusive
    flags = 0x01 | (0x02 if level else 0)
    body = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", 0x89, len(body)) + body


def resource_template(*descs: bytes) -> bytes:
    data = b"".join(descs) + bytes([0x79, 0])  # End Tag, checksum 0 ("always valid")
    return buffer(data)
