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
from contextlib import contextmanager
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
