"""The e1000 guest (guests/src/e1000.c) on pyvmm's 82540EM on a real TAP, both irqchips:
the test reads the guest's frames off the TAP (12 broadcasts over an 8-descriptor ring,
one UDP frame whose IP and UDP checksums the device inserted) and sends it 20 frames
that must arrive (unicast to its MAC, broadcast, a multicast group it put in the MTA:
the 16-descriptor ring wraps) and some that the filter must drop (another unicast MAC,
a group not in the MTA). The guest checks EEPROM, PHY, link changes, interrupt causes
and what a broken driver does; the exit table counts the accesses per register.
Frames use a local experimental ethertype (0x88b5), nothing leaves this machine."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pyvmm_cmd, wait_for_path

ETH_P_ALL = 0x0003
MAC = bytes.fromhex("525400aabb01")
SRC = bytes.fromhex("020000000001")


def csum(payload: bytes) -> int:
    s = 0
    for b in payload:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


def inet_sum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    s: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def frame(dst: bytes, text: bytes) -> bytes:
    return dst + SRC + b"\x88\xb5" + text


def accesses(rep: dict[str, Any], name: str) -> dict[tuple[str, int, int], int]:
    dev = next(d for b in rep["buses"] for d in b["devices"] if d["name"] == name)
    return {(a["kind"], a["offset"], a["size"]): a["count"] for a in dev["accesses"]}


def open_tap(tap: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((tap, 0))
    sock.settimeout(60)
    return sock


def host_side(sock: socket.socket) -> tuple[list[bytes], list[bytes], int]:
    """Read the guest's 13 frames, send it the accepted and the filtered ones; returns
    (frames from the guest, frames it must receive in order, how many were filtered)."""
    got: list[bytes] = []
    while len(got) < 13:  # guest -> TAP: 12 frames and the checksummed one
        f = sock.recv(65536)
        if f[6:12] == MAC:
            got.append(f)
    good = [frame(MAC, b"pyvmm-uni %d" % i) for i in range(8)]
    good += [frame(b"\xff" * 6, b"pyvmm-bcast %d" % i + bytes(range(i * 50)))
             for i in range(6)]
    good += [frame(bytes.fromhex("01005e123456"), b"pyvmm-mcast %d" % i) for i in range(6)]
    dropped = [frame(bytes.fromhex("525400aabb99"), b"pyvmm-other"),
               frame(bytes.fromhex("01005e123457"), b"pyvmm-othergroup")]
    filtered = 0
    for k, f in enumerate(good):  # TAP -> guest, the filtered ones in between
        sock.send(f)
        if k % 7 == 3:
            for d in dropped:
                sock.send(d)
                filtered += 1
    good.append(frame(MAC, b"pyvmm-end"))
    sock.send(good[-1])
    return got, good, filtered


def check_frames(text: str, got: list[bytes], good: list[bytes]) -> None:
    # what the guest sent, in order; the UDP frame's checksums are the device's
    plain = [f for f in got if f[12:14] == b"\x88\xb5"]
    assert [f[14:].rstrip(b"\0") for f in plain] == [b"pyvmm-e1000 tx 7 %d" % k
                                                     for k in range(12)]
    assert all(len(f) == 60 and f[:6] == b"\xff" * 6 for f in plain)
    (udp,) = [f for f in got if f[12:14] == b"\x08\x00"]
    assert inet_sum(udp[14:34]) == 0xFFFF  # IP header checksum inserted
    ulen = struct.unpack(">H", udp[38:40])[0]
    pseudo = udp[26:34] + struct.pack(">BBH", 0, 17, ulen)
    assert inet_sum(pseudo + udp[34:34 + ulen]) == 0xFFFF  # UDP checksum inserted
    assert udp[42:42 + 10] == b"pyvmm-csum"
    # what the guest received: the accepted frames, in order, and none of the dropped
    # (the host's stack could put a frame of its own on the TAP: only ours are counted)
    rx = [line for line in text.splitlines() if line.startswith("rx ") and "payload=pyvmm" in line]
    assert len(rx) == len(good)
    for line, f in zip(rx, good, strict=True):
        padded = f + bytes(max(0, 60 - len(f)))
        assert f"len={len(padded) + 4} " in line, line  # padded to 60, FCS counted
        assert f"sum={csum(padded[14:]):x} " in line, line
    assert "other" not in "".join(rx)


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_e1000_frames_both_ways(guests: Path, tap: str, chip: str, tmp_path: Path) -> None:
    sock = open_tap(tap)
    js = tmp_path / "exits.json"
    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "120", "--irqchip", chip,
                                      "--kernel", str(guests / "e1000.elf"), "--net",
                                      f"tap={tap},model=e1000,mac=52:54:00:aa:bb:01",
                                      "--cmdline", "seed=7 slu=1 bad=1",
                                      "--exits-json", str(js)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got, good, filtered = host_side(sock)
        out, err = proc.communicate(timeout=120)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0 and "e1000: all passed" in text, text[-3000:] + err.decode()[-2000:]
    assert "e1000 mac=52:54:00:aa:bb:01" in text and "e1000 phy id=01410c20" in text
    for line in ("ok IOADDR/IODATA reach the registers", "ok clearing SLU drops the link",
                 "ok link up again: LSC", "ok ICR read-to-clear",
                 "ok INTx for an unmasked cause", "ok no INTx for a masked cause",
                 "ok transmit ring wrapped, TDH == TDT",
                 "ok tx buffer outside RAM: descriptor completed",
                 "ok tx tail past the ring: head stays", "ok tx ring outside RAM: head stays",
                 "ok CTRL.RST cleared the rings", "ok receive ring wrapped"):
        assert line in text, line
    check_frames(text, got, good)
    # the exit table: every register access counted per offset
    rep = json.loads(js.read_text())
    bar0 = accesses(rep, "e1000.bar0")
    assert bar0[("w", 0x3818, 4)] >= 14  # TDT: one write per frame sent (and the bad ones)
    assert bar0[("w", 0x2818, 4)] >= len(good)  # RDT: one per descriptor given back
    assert bar0[("r", 0x14, 4)] >= 64  # EERD: one read per EEPROM word at least
    dev = next(d for d in rep["devices"] if d["type"] == "e1000")
    assert dev["rx_frames"] >= len(good) and dev["tx_frames"] == 13
    assert dev["rx_filtered"] >= filtered
    assert dev["errors"]["tx:buf"] == 1 and dev["errors"]["tx:bounds"] >= 1


def test_e1000_bad_mac_is_one_line(guests: Path) -> None:
    p = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "hello.elf"), "--net",
                                 "tap=x,model=e1000,mac=01:00:00:00:00:01"),
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "multicast" in p.stderr


def test_e1000_and_virtio_net_guests_through_the_switch(guests: Path) -> None:
    """One learning switch (the vhost-user-net backend) with two guests on it: a
    virtio-net guest on a vhost-user socket, an e1000 guest whose VMM joined by the
    switch's port socket (--net model=e1000,switch=PATH). The virtio-net guest's broadcast
    reaches the e1000 guest, whose unicast answer comes back through the switch, which
    learned the MAC. No TAP: nothing but the switch carries the frames."""
    sockdir = Path(tempfile.mkdtemp(prefix="pyvmm-e1k-"))
    path, port = sockdir / "net.sock", sockdir / "port.sock"
    procs: list[subprocess.Popen[str]] = []
    try:
        be = subprocess.Popen(pyvmm_cmd("backend", "vhost-user-net", "--socket", str(path),
                                        "--port", str(port)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        procs.append(be)
        assert wait_for_path(path) and wait_for_path(port)
        e1k = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "90", "--kernel",
                                         str(guests / "e1000.elf"), "--net",
                                         f"model=e1000,switch={port},mac=52:54:00:aa:bb:01",
                                         "--cmdline", "peer=1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(e1k)
        assert e1k.stdout is not None
        before = []
        for line in e1k.stdout:  # the e1000 guest's receive ring is ready
            before.append(line)
            if "e1000: rx ready" in line:
                break
        else:
            pytest.fail("e1000 guest never got ready: " + "".join(before[-20:]))
        vnet = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "60", "--kernel",
                                          str(guests / "virtio_net.elf"), "--net",
                                          f"model=vhost-user,socket={path},"
                                          "mac=52:54:00:aa:bb:cd", "--cmdline", "seed=33"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(vnet)
        vout, verr = vnet.communicate(timeout=90)
        eout, eerr = e1k.communicate(timeout=90)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert e1k.returncode == 0, eout + eerr
    assert "rx from peer 52:54:00:aa:bb:cd payload=pyvmm-tx 33" in eout
    assert "e1000: answered the peer" in eout
    assert vnet.returncode == 0, vout + verr
    rx = [ln for ln in vout.splitlines() if ln.startswith("rx ")]
    assert len(rx) == 1 and "payload=pyvmm-end from e1" in rx[0], vout


def test_e1000_switch_port_that_is_not_there_is_one_line(guests: Path, tmp_path: Path) -> None:
    p = subprocess.run(pyvmm_cmd("run", "-q", "--kernel", str(guests / "hello.elf"), "--net",
                                 f"model=e1000,switch={tmp_path / 'none.sock'}"),
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "switch port" in p.stderr
    assert not (tmp_path / "none.sock").exists()
