"""NVMe virtual functions: one ``pyvmm backend vfio-user --device nvme --vfs 4``
process, four pyvmm VMs each attached to its own VF (``--device vfio-user,socket=Si``)
running the NVMe tiny guest concurrently, each writing its own pattern (seed=) and
trying one write and one read at the first LBA past its namespace (oob=1), which on
the image is the next VF's first block. The host then checks that every slice holds
only its VM's pattern and the rest of the image is untouched, that each VM saw LBA Out
of Range (0x80, generic, DNR), and that the physical function's report lists the four
VFs with their counters (and VF 3's rate limit at work). Both irqchips; seccomp: the
default (enforce), for the backend and the VMs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd, wait_for_path
from tests.kvm.test_nvme import pattern

MiB = 1 << 20
VFS, VF_SIZE = 4, 2 * MiB
TAIL = 64 << 10  # image bytes past the last VF: no VF's
SEEDS = [0x11, 0x22, 0x44, 0x88]
# Bytes the guest moves successfully: 16 x 4 KiB written and read back, 64 KiB written
# and read, one 4 KiB read after the bad commands (those move nothing).
GUEST_BYTES = 32 * 4096 + 2 * 65536 + 4096


def xored(data: bytes, seed: int) -> bytes:
    return bytes(b ^ seed for b in data)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pyvmm-vfs-"))  # AF_UNIX paths are short
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_four_vms_on_four_vfs_of_one_nvme_process(guests: Path, sockdir: Path,
                                                   tmp_path: Path, chip: str) -> None:
    img = tmp_path / "shared.img"
    before = os.urandom(VFS * VF_SIZE + TAIL)
    img.write_bytes(before)
    socks = [sockdir / f"vf{i}" for i in range(VFS)]
    stats = tmp_path / "pf.json"
    log = tmp_path / "backend.log"
    args = ["backend", "vfio-user", "--device", "nvme", "--disk", str(img),
            "--vfs", str(VFS), "--vf-size", "2M", "--stats-json", str(stats)]
    for s in socks:
        args += ["--socket", str(s)]
    # VF 3 alone is limited: one command at a time, 20 a second.
    args += ["--vf-limit", "none"] * 3 + ["--vf-limit", "iops=20,iops_burst=1"]
    with log.open("wb") as lf:
        backend = subprocess.Popen(pyvmm_cmd(*args), stdout=subprocess.DEVNULL, stderr=lf)
    vms: list[subprocess.Popen[str]] = []
    try:
        assert all(wait_for_path(s) for s in socks), log.read_text()
        for i, s in enumerate(socks):
            # spin=: a command of the limited VF waits for its bucket; the guest's
            # polling budget must outlast that on a loaded host.
            vms.append(subprocess.Popen(
                pyvmm_cmd("run", "--timeout", "150", "--kernel", str(guests / "nvme.elf"),
                          "--irqchip", chip, "--device", f"vfio-user,socket={s}",
                          "--cmdline", f"seed={SEEDS[i]} oob=1 spin=4000000000"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [vm.communicate(timeout=300) for vm in vms]
    finally:
        for vm in vms:
            if vm.poll() is None:
                vm.kill()
                vm.wait()
        backend.terminate()
        backend.wait(timeout=30)
    for i, (vm, (out, err)) in enumerate(zip(vms, outs, strict=True)):
        assert vm.returncode == 0, f"VM {i}:\n{out[-2000:]}\n{err[-2000:]}"
        assert "nvme: all passed" in out
        nsze = VF_SIZE // 512
        # The spec's status for an LBA past the namespace: SCT 0 (generic), SC 0x80
        # (LBA Out of Range), DNR — the 15-bit status field the guest prints.
        assert f"nvme oob-write lba={nsze} status=4080" in out, out[-2000:]
        assert f"nvme oob-read lba={nsze} status=4080" in out
        assert f"nvme nsze={nsze} " in out  # each VF's namespace is its slice
    assert backend.returncode == 0, log.read_text()

    data = img.read_bytes()
    for i, seed in enumerate(SEEDS):
        sl = data[i * VF_SIZE:(i + 1) * VF_SIZE]
        orig = before[i * VF_SIZE:(i + 1) * VF_SIZE]
        for b in range(16):  # 16 x 4 KiB at LBA 8b: this VM's pattern, no other
            assert sl[4096 * b:4096 * (b + 1)] == xored(pattern(4096, b), seed), (i, b)
        assert sl[1024 * 512:1024 * 512 + 65536] == xored(pattern(65536, 99), seed), i
        assert sl[65536:1024 * 512] == orig[65536:1024 * 512], i  # nothing else written
        assert sl[1024 * 512 + 65536:] == orig[1024 * 512 + 65536:], i
    assert data[VFS * VF_SIZE:] == before[VFS * VF_SIZE:]  # the tail belongs to no VF

    rep = json.loads(stats.read_text())
    vfs = rep["vfs"]
    assert [v["vf"] for v in vfs] == list(range(VFS))
    assert [v["socket"] for v in vfs] == [str(s) for s in socks]
    assert [(v["offset"], v["size"]) for v in vfs] == [(i * VF_SIZE, VF_SIZE)
                                                       for i in range(VFS)]
    for v in vfs:
        assert v["sessions"] == 1 and v["commands"] > 40
        assert v["bytes"] == GUEST_BYTES  # each VF moved its own guest's data only
        assert v["failures"] >= 2  # at least the two out-of-range commands
    # The same guest on every VF: the same commands, the same failures.
    assert len({(v["commands"], v["failures"]) for v in vfs}) == 1
    assert [v["limits"] for v in vfs] == [{}, {}, {}, {"iops": 20, "iops_burst": 1}]
    assert [v["throttled"] for v in vfs[:3]] == [0, 0, 0]  # no buckets, never held
    # VF 3: one token, refilled every 50 ms; its guest sends ~45 I/O commands back to
    # back, each right after the previous completed, so the bucket is found empty.
    assert vfs[3]["throttled"] > 0
    text = log.read_text()
    for i in range(VFS):
        assert f"pyvmm: VF {i} {socks[i]}: LBAs {i * VF_SIZE // 512}+{VF_SIZE // 512}" in text


def test_a_vf_client_dying_leaves_the_others_going(guests: Path, sockdir: Path,
                                                   tmp_path: Path) -> None:
    """On VF 0: a client that sends a malformed stream and vanishes, then a VM killed
    (SIGKILL) whenever it happens to be; meanwhile VF 1's VM runs its whole driver and
    passes. Then a new VM on VF 0 passes too: the function outlives its clients."""
    import select
    import signal
    import socket
    import time

    img = tmp_path / "shared.img"
    before = os.urandom(2 * VF_SIZE)
    img.write_bytes(before)
    socks = [sockdir / "vf0", sockdir / "vf1"]
    stats, log = tmp_path / "pf.json", tmp_path / "backend.log"
    args = ["backend", "vfio-user", "--device", "nvme", "--disk", str(img), "--vfs", "2",
            "--socket", str(socks[0]), "--socket", str(socks[1]), "--stats-json", str(stats)]
    with log.open("wb") as lf:
        backend = subprocess.Popen(pyvmm_cmd(*args), stdout=subprocess.DEVNULL, stderr=lf)

    def vm(sock: Path, seed: int, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            pyvmm_cmd("run", "--timeout", "150", "--kernel", str(guests / "nvme.elf"),
                      "--device", f"vfio-user,socket={sock}",
                      "--cmdline", f"seed={seed} spin=4000000000 {' '.join(extra)}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs: list[subprocess.Popen[str]] = []
    try:
        assert all(wait_for_path(s) for s in socks), log.read_text()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(socks[0]))
            c.sendall(b"\xff" * 64)  # not a vfio-user header: that session closes
        victim = vm(socks[0], 0x33, "bench=4096")  # a long run, to be killed
        procs.append(victim)
        other = vm(socks[1], 0x55)
        procs.append(other)
        # Killed once its driver has the controller's I/O queues (so it has a session),
        # wherever it then is: writing, reading, or in its benchmark.
        assert victim.stdout is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "ok create I/O SQ 1" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([victim.stdout], [], [], 1.0)
            if ready:
                line = victim.stdout.readline()
                if not line:
                    break  # it ended: the assertion below says how
                seen += line
        assert "ok create I/O SQ 1" in seen, seen[-2000:]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        out, err = other.communicate(timeout=300)
        assert other.returncode == 0 and "nvme: all passed" in out, out[-2000:] + err
        again = vm(socks[0], 0x66)
        procs.append(again)
        out0, err0 = again.communicate(timeout=300)
        assert again.returncode == 0 and "nvme: all passed" in out0, out0[-2000:] + err0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        backend.terminate()
        backend.wait(timeout=30)
    assert backend.returncode == 0, log.read_text()
    data = img.read_bytes()
    for i, seed in ((0, 0x66), (1, 0x55)):  # the last writer of each slice
        sl = data[i * VF_SIZE:(i + 1) * VF_SIZE]
        assert sl[1024 * 512:1024 * 512 + 65536] == xored(pattern(65536, 99), seed), i
        for b in range(16):
            assert sl[4096 * b:4096 * (b + 1)] == xored(pattern(4096, b), seed), (i, b)
    vfs = json.loads(stats.read_text())["vfs"]
    # VF 0: the malformed client, the killed VM and the new one, each its own session
    # (and its own controller); VF 1: its one VM, which never noticed.
    assert [v["sessions"] for v in vfs] == [3, 1]
    assert vfs[1]["bytes"] == GUEST_BYTES and vfs[0]["bytes"] >= GUEST_BYTES
