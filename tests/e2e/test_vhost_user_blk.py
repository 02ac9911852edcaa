"""Linux's own virtio_blk driver, under QEMU (TCG) with vhost-user-blk-pci, against
pyvmm's vhost-user backend — the same VirtioBlk class the in-VMM device uses."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.framework.qemu import run_linux

pytestmark = pytest.mark.qemu


@contextmanager
def backend(pairs: list[tuple[Path, Path]]) -> Iterator[subprocess.Popen[bytes]]:
    args = [sys.executable, "-m", "pyvmm", "backend", "vhost-user-blk"]
    for sock, img in pairs:
        args += ["--socket", str(sock), "--disk", str(img)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not all(s.exists() for s, _ in pairs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(s.exists() for s, _ in pairs), "backend did not start"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert not any(s.exists() for s, _ in pairs)  # sockets cleaned up


SCRIPT = """
ls /sys/block | grep -q vda || exit 10
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M count=4 oflag=direct 2>/dev/null || exit 11
sync
dd if=/dev/vda of=/tmp/q bs=1M count=4 iflag=direct 2>/dev/null || exit 12
cmp /tmp/p /tmp/q || exit 13
echo "SHA=$(sha256sum /tmp/p | cut -d' ' -f1)"
echo "DISCARD_MAX=$(cat /sys/block/vda/queue/discard_max_bytes)"
blkdiscard -o 8388608 -l 1048576 /dev/vda || exit 14
echo "SERIAL=$(cat /sys/block/vda/serial)"
"""


def vu_args(sock: Path, n: int = 0) -> list[str]:
    return ["-chardev", f"socket,id=vu{n},path={sock}", "-device",
            f"vhost-user-blk-pci,chardev=vu{n},num-queues=1"]


def test_linux_writes_through_our_backend_and_the_host_reads_it(tmp_path: Path) -> None:
    img, sock = tmp_path / "d.img", tmp_path / "vu.sock"
    img.write_bytes(bytes(16 << 20))
    img_view = bytearray(img.read_bytes())
    img_view[8 << 20:9 << 20] = b"\xaa" * (1 << 20)  # discarded by the guest later
    img.write_bytes(bytes(img_view))
    with backend([(sock, img)]):
        r = run_linux(tmp_path, SCRIPT, vu_args(sock))
    assert r.rc == 0, r.output[-1500:]
    sha = re.search(r"SHA=([0-9a-f]{64})", r.output)
    assert sha and hashlib.sha256(img.read_bytes()[:4 << 20]).hexdigest() == sha.group(1)
    assert "DISCARD_MAX=0" not in r.output  # the driver saw VIRTIO_BLK_F_DISCARD
    assert "SERIAL=pyvmm-vu0" in r.output
    data = img.read_bytes()
    assert data[8 << 20:9 << 20] == bytes(1 << 20)  # the discard reached the file


def test_two_guests_one_backend_each_its_own_image(tmp_path: Path) -> None:
    import threading

    pairs = [(tmp_path / f"vu{i}.sock", tmp_path / f"d{i}.img") for i in range(2)]
    for _, img in pairs:
        img.write_bytes(bytes(16 << 20))
    results: dict[int, object] = {}
    with backend(pairs):
        def go(i: int) -> None:
            d = tmp_path / f"g{i}"
            d.mkdir()
            results[i] = run_linux(d, SCRIPT, vu_args(pairs[i][0], i))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    shas = []
    for i in range(2):
        r = results[i]
        assert r.rc == 0, r.output[-1500:]  # type: ignore[attr-defined]
        m = re.search(r"SHA=([0-9a-f]{64})", r.output)  # type: ignore[attr-defined]
        assert m
        shas.append(m.group(1))
        # each image holds exactly its own guest's data
        assert hashlib.sha256(pairs[i][1].read_bytes()[:4 << 20]).hexdigest() == m.group(1)
    assert shas[0] != shas[1]
    assert os.path.getsize(pairs[0][1]) == 16 << 20


CRASH_SCRIPT = """
dd if=/dev/urandom of=/tmp/p bs=1M count=32 2>/dev/null
echo START
i=0
while [ $i -lt 32 ]; do
  dd if=/tmp/p of=/dev/vda bs=1M count=1 skip=$i seek=$i oflag=direct 2>/dev/null || echo "WERR $i"
  i=$((i+1))
done
echo WROTE
sync
dd if=/dev/vda of=/tmp/q bs=1M count=32 iflag=direct 2>/dev/null || echo RERR
cmp /tmp/p /tmp/q || exit 20
echo "SHA=$(sha256sum /tmp/p | cut -d' ' -f1)"
"""


def test_backend_killed_mid_io_and_restarted_loses_nothing(tmp_path: Path) -> None:
    """kill -9 of the backend while Linux writes; a new backend on the same socket; QEMU's
    vhost-user-blk reconnects (chardev reconnect=1), restores each ring's base from its
    used index and hands the new backend the inflight region (INFLIGHT_SHMFD) the old
    one kept, so the requests it had taken and not completed — which with the I/O pool
    may have completed out of order — are served again, and no others."""
    import shutil as sh
    import signal

    from tests.framework import kit

    img, sock = tmp_path / "d.img", tmp_path / "vu.sock"
    img.write_bytes(bytes(64 << 20))

    logs: list[Path] = []

    def start() -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"backend{len(logs)}.log")
        with logs[-1].open("wb") as log:
            p = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "vhost-user-blk",
                                  "--socket", str(sock), "--disk", str(img)], stderr=log)
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return p

    k = kit.build()
    (tmp_path / "i.cpio").write_bytes(kit.initramfs(k, CRASH_SCRIPT))
    exe = sh.which("qemu-system-x86_64")
    assert exe
    backend_proc = start()
    q = subprocess.Popen([exe, "-accel", "tcg", "-M", "q35,memory-backend=mem", "-object",
                          "memory-backend-memfd,id=mem,size=256M,share=on", "-m", "256M",
                          "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
                          "-no-reboot", "-kernel", str(k.vmlinux), "-initrd",
                          str(tmp_path / "i.cpio"), "-append", "console=ttyS0 panic=-1 quiet",
                          "-chardev", f"socket,id=vu,path={sock},reconnect=1",
                          "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert q.stdout is not None
    os.set_blocking(q.stdout.fileno(), False)
    out, killed_before_done = b"", None
    try:
        t0 = time.monotonic()
        while q.poll() is None and time.monotonic() - t0 < 240:
            with suppress(BlockingIOError):
                out += os.read(q.stdout.fileno(), 65536)
            if b"START" in out and killed_before_done is None:
                time.sleep(0.8)
                backend_proc.send_signal(signal.SIGKILL)
                backend_proc.wait()
                killed_before_done = b"WROTE" not in out
                time.sleep(1.0)
                sock.unlink(missing_ok=True)  # what a crashed server leaves behind
                backend_proc = start()
            time.sleep(0.05)
    finally:
        if q.poll() is None:
            q.kill()
        q.wait()
        backend_proc.terminate()
        backend_proc.wait(timeout=30)
    # QEMU may exit between two polls: the guest's last lines are still in the pipe.
    os.set_blocking(q.stdout.fileno(), True)
    out += q.stdout.read()
    text = out.decode(errors="replace")
    assert killed_before_done, "the backend must die while the guest is still writing"
    assert "TCG-TEST-RC=0" in text and "WERR" not in text, text[-1500:]
    sha = re.search(r"SHA=([0-9a-f]{64})", text)
    assert sha and hashlib.sha256(img.read_bytes()[:32 << 20]).hexdigest() == sha.group(1)
    restarted = logs[-1].read_text()
    assert "Traceback" not in restarted, restarted
    print("restarted backend:", restarted.strip() or "(nothing left in flight)")
