"""virtio-net on a real TAP: a frame the guest sends appears on the TAP (read by the
test), frames written to the TAP reach the guest, one of them merged over two receive
buffers. The TAP has no address; frames use a local experimental ethertype (0x88b5),
so nothing leaves this machine. The test creates and deletes the TAP itself."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd

ETH_P_EXP = 0x88B5


def csum(payload: bytes) -> int:
    s = 0
    for b in payload:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_frames_both_ways_with_mergeable_rx(guests: Path, tap: str, transport: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_EXP))
    sock.bind((tap, 0))
    sock.settimeout(30)
    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "60", "--kernel",
                                      str(guests / "virtio_net.elf"), "--net",
                                      f"tap={tap},mac=52:54:00:aa:bb:cc,transport={transport}",
                                      "--cmdline", f"seed=31 mmio={int(transport == 'mmio')}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        frame = sock.recv(65536)  # guest -> TAP
        assert frame[6:12] == bytes.fromhex("525400aabbcc")
        assert frame[12:14] == b"\x88\xb5" and frame[14:23] == b"pyvmm-tx "
        assert frame[14:].rstrip(b"\0") == b"pyvmm-tx 31"
        big = os.urandom(4000)
        payloads = [b"hello-guest", big, b"pyvmm-end"]
        for pl in payloads:  # TAP -> guest
            sock.send(frame[6:12] + bytes.fromhex("020000000001") + b"\x88\xb5" + pl)
        out, err = proc.communicate(timeout=60)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    assert "virtio-net mac=52:54:00:aa:bb:cc" in text
    rx = [line for line in text.splitlines() if line.startswith("rx ")]
    assert len(rx) == 3
    for line, pl in zip(rx, payloads, strict=True):
        assert f"len={14 + len(pl)} " in line and f"sum={csum(pl):x} " in line
    assert "nbuf=2" in rx[1]  # 4014 bytes over 2048-byte buffers: merged


def test_bad_net_option_is_one_line(guests: Path) -> None:
    p = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "hello.elf"), "--net",
                                 "tap=x,mac=01:00:00:00:00:01"), capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "multicast" in p.stderr
