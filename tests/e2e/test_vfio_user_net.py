"""Linux's virtio_net, bound to pyvmm's virtio-net PCI function exported over vfio-user,
pings and sends TCP to a peer on our side. Everything stays on this machine: the TAP,
its 192.0.2.1 (TEST-NET-1) address and the TCP sink live in a network namespace this
test creates and deletes; the backend runs inside it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework import kit

pytestmark = pytest.mark.qemu

SINK = """
import hashlib, socket, sys
s = socket.socket(); s.bind(("192.0.2.1", 5555)); s.listen(1); s.settimeout(200)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

SCRIPT = """
ip link set lo up
ip link set eth0 up || exit 10
ip addr add 192.0.2.2/24 dev eth0
ping -c 3 -W 5 192.0.2.1 | sed 's/^/PING /'
dd if=/dev/urandom of=/tmp/d bs=64k count=16 2>/dev/null
echo "SHA=$(sha256sum /tmp/d | cut -d' ' -f1)"
nc 192.0.2.1 5555 < /tmp/d || exit 11
"""


def test_linux_virtio_net_over_vfio_user_ping_and_tcp(tmp_path: Path) -> None:
    for tool in ("debootstrap", "unshare", "ip"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    from tests.framework.sid import qemu_in_sid, vfio_user_linux_args

    ns = f"pvmns{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nsx = ["ip", "netns", "exec", ns]
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "tuntap", "add", "dev", "pvt0", "mode", "tap"],
                    ["ip", "addr", "add", "192.0.2.1/24", "dev", "pvt0"],
                    ["ip", "link", "set", "pvt0", "up"]):
            subprocess.run(nsx + cmd, check=True)
        sink = subprocess.Popen([*nsx, sys.executable, "-c", SINK], stdout=subprocess.PIPE)
        procs.append(sink)
        sock = tmp_path / "vfu.sock"
        backend = [sys.executable, "-m", "pyvmm", "backend", "vfio-user", "--device",
                   "virtio-net", "--tap", "pvt0", "--socket", str(sock)]
        procs.append(subprocess.Popen([*nsx, *backend], stderr=subprocess.PIPE))
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        k = kit.build()
        shutil.copy(k.vmlinux, tmp_path / "vmlinux")
        (tmp_path / "initrd.cpio").write_bytes(kit.initramfs(k, SCRIPT))
        r = qemu_in_sid(tmp_path, vfio_user_linux_args(), timeout=240)
        out = r.stdout.decode(errors="replace")
        sink_out, _ = sink.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert "TCG-TEST-RC=0" in out, out[-2000:]
    assert re.search(r"3 packets transmitted, 3 packets received", out), out[-1500:]
    sha = re.search(r"SHA=([0-9a-f]{64})", out)
    n, digest = sink_out.decode().split()
    assert sha and digest == sha.group(1) and int(n) == 16 * 65536
    assert hashlib.sha256(b"").hexdigest() != digest
