"""Two Linux guests (QEMU 11 from the sid tree, software emulation, vhost-user-net;
QEMU 7.2's vhost-user-net segfaults as the guest starts, with any backend) on one pyvmm
backend process: each guest's virtio_net is a pyvmm VirtioNet on a port of pyvmm's
learning switch. Guest A pings guest B and sends 256 KiB over TCP; B checks what
arrived. The traffic exists only between the two guests and the switch: no TAP, no
host address, nothing leaves the backend process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for_path

pytestmark = pytest.mark.qemu

GUEST_A = """
ip link set eth0 up || exit 10
ip addr add 192.0.2.1/24 dev eth0
i=0
until ping -c 1 -W 1 192.0.2.2 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 90 ] && exit 11; done
ping -c 3 -W 5 192.0.2.2 | sed 's/^/PING /'
dd if=/dev/urandom of=/tmp/p bs=1k count=256 2>/dev/null
echo "SHA=$(sha256sum /tmp/p | cut -d' ' -f1)"
i=0
until nc 192.0.2.2 5000 < /tmp/p; do sleep 1; i=$((i+1)); [ $i -gt 30 ] && exit 12; done
"""

GUEST_B = """
ip link set eth0 up || exit 10
ip addr add 192.0.2.2/24 dev eth0
nc -l -p 5000 > /tmp/q || exit 11
echo "GOT=$(sha256sum /tmp/q | cut -d' ' -f1) $(wc -c < /tmp/q)"
"""


def qemu_args(initrd: str, sock: str, mac: str) -> list[str]:
    return ["-accel", "tcg", "-M", "q35,memory-backend=mem", "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on", "-m", "256M", "-nodefaults",
            "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", "/wd/vmlinux", "-initrd", initrd,
            "-append", "console=ttyS0 panic=-1 quiet",
            "-chardev", f"socket,id=c0,path={sock}",
            "-netdev", "vhost-user,id=n0,chardev=c0",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]


def test_two_guests_ping_and_tcp_through_the_switch(tmp_path: Path) -> None:
    from tests.framework.sid import prepare_guest, qemu_in_sid_popen

    prepare_guest(tmp_path, {"a": GUEST_A, "b": GUEST_B})
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    backend = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "vhost-user-net",
                                "--socket", str(socks[0]), "--socket", str(socks[1])],
                               stderr=subprocess.PIPE)
    guests: list[subprocess.Popen[bytes]] = []
    try:
        assert all(wait_for_path(s) for s in socks), "backend did not start"
        for name, sock, mac in (("a", socks[0], "52:54:00:0a:00:01"),
                                ("b", socks[1], "52:54:00:0b:00:02")):
            guests.append(qemu_in_sid_popen(tmp_path, qemu_args(
                f"/wd/{name}.cpio", f"/wd/{sock.name}", mac)))
        outs = [g.communicate(timeout=240)[0].decode(errors="replace") for g in guests]
    finally:
        for g in guests:
            if g.poll() is None:
                g.kill()
                g.wait()
        backend.terminate()
        _, err = backend.communicate(timeout=30)
    a, b = outs
    assert "TCG-TEST-RC=0" in a, a[-1500:]
    assert "TCG-TEST-RC=0" in b, b[-1500:]
    assert re.search(r"PING 3 packets transmitted, 3 packets received", a), a[-1500:]
    sha = re.search(r"SHA=([0-9a-f]{64})", a)
    got = re.search(r"GOT=([0-9a-f]{64}) (\d+)", b)
    assert sha and got and got.group(1) == sha.group(1) and int(got.group(2)) == 256 << 10
    assert b"Traceback" not in err, err.decode(errors="replace")[-1500:]
