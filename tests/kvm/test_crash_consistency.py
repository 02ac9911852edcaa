"""Crash consistency (#18 item 5): the VMM is SIGKILLed at a random moment while a
guest writes and flushes; every block the guest saw acknowledged before a completed
FLUSH is in the image. And a host file system that runs out of space answers the
guest with the spec's error status instead of losing the request or the VMM."""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd

BLOCK = 4096
BLOCKS = 2048  # the 8 MiB image; the guest writes them round and round until killed
ROUNDS = 50


def expected_block(i: int, seed: int) -> bytes:
    words = [i, seed] + [((i * 0x9E3779B97F4A7C15) ^ (seed << 32) ^ w) & (2**64 - 1)
                         for w in range(2, 512)]
    return struct.pack("<512Q", *words)


def run_and_kill(guests: Path, img: Path, seed: int, delay: float) -> tuple[int, bool]:
    """Start the writer, SIGKILL the VMM ``delay`` s after its first durable write;
    returns the last write reported durable and whether the VMM was killed."""
    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--kernel", str(guests / "blkcrash.elf"),
                                      "--disk", f"path={img}", "--cmdline",
                                      f"n=1000000000 seed={seed} flush_every=4 "
                                      f"blocks={BLOCKS}"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = b""
    killed = False
    start = None  # the kill clock starts at the first durable write, however slow the start
    boot_deadline = time.monotonic() + 60
    try:
        while True:
            if start is None and b"durable " in out:
                start = time.monotonic()
            now = time.monotonic()
            left = (delay - (now - start)) if start is not None else boot_deadline - now
            if left <= 0:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            r, _, _ = select.select([proc.stdout], [], [], left)
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # the guest finished before the kill
                out += chunk
        proc.wait(30)
        out += proc.stdout.read()  # what was already in the pipe when it died
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # Only whole lines: a kill can cut the last one short ("durable 12" of "durable 123").
    lines = out.decode(errors="replace").split("\n")[:-1]
    durable = [int(line.split()[1]) for line in lines if line.startswith("durable ")]
    return (durable[-1] if durable else -1), killed


def test_acknowledged_flushed_writes_survive_sigkill(guests: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8 << 20))
    rnd = random.Random(1817)
    checked = 0
    for round_ in range(ROUNDS):
        seed = 1000 + round_  # each round's blocks differ from every earlier round's
        last, killed = run_and_kill(guests, img, seed, rnd.uniform(0.3, 1.5))
        assert killed and last >= 0  # the guest never ends by itself: every round is a kill
        data = img.read_bytes()
        # The newest write of each block up to the last durable one must be there — or
        # a later write to the same block (the guest went on writing after that flush,
        # round the disk, until the kill), whole.
        for i in range(max(0, last - BLOCKS + 1), last + 1):
            b = i % BLOCKS
            got = data[b * BLOCK:(b + 1) * BLOCK]
            j = struct.unpack_from("<Q", got)[0]
            assert j >= i and j % BLOCKS == b and got == expected_block(j, seed), (
                f"round {round_}: write {i} (block {b}) was acknowledged and flushed "
                f"before the kill (durable up to {last}) but the block holds "
                f"{f'write {j}' if got == expected_block(j, seed) else 'something else'}")
        checked += last + 1
    assert checked > 0  # the guest got writes acknowledged in the time it had


def test_a_full_host_file_system_is_an_ioerr_for_the_guest(guests: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) to make a small tmpfs")
    d = Path(tempfile.mkdtemp(prefix="pyvmm-enospc-"))
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        try:
            img = d / "sparse.img"
            with open(img, "wb") as f:
                f.truncate(8 << 20)  # 8 MiB that the 256 KiB file system cannot hold
            p = subprocess.run(pyvmm_cmd("run", "-q", "--kernel", str(guests / "blkcrash.elf"),
                                         "--disk", f"path={img}", "--cmdline",
                                         "n=200 seed=7 flush_every=4", "--timeout", "60"),
                               capture_output=True, text=True, timeout=120)
            # The guest got VIRTIO_BLK_S_IOERR (1) for the first write that did not fit,
            # and ended itself: exit(3) through the test-exit port is (3 << 1) | 1.
            assert "ioerr " in p.stdout and p.returncode == 7, p.stdout + p.stderr
            i, status = map(int, p.stdout.split("ioerr ")[1].split()[:2])
            assert status == 1 and 0 < i < 200
            assert "Traceback" not in p.stderr
        finally:
            subprocess.run(["umount", str(d)], check=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)
