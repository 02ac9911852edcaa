"""pyvmm's own VM with a PCI function that lives in another process, through the
vfio-user client (``--device vfio-user,socket=S``) and ``pyvmm backend vfio-user``:
the NVMe tiny guest against the exported NVMe controller (the host reads back what the
guest wrote; its DMA went straight into guest RAM; its MSI-X interrupts came by the
irqfds the server writes — the VMM raised none), and the shared-BAR guest against the
exported PCI test device (BAR4 is a KVM memslot: its accesses never exit, and follow a
BAR move). Both irqchips. Also: the fallback without irqfds, mapping turned off, a
socket that is not there, and the server killed mid-run (the VM goes on, no hang)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pyvmm_cmd, wait_for_path
from tests.kvm.test_nvme import check_image


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="pyvmm-vfu-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "nvme.img"
    before = bytes((i * 7 + 3) & 0xFF for i in range(2 << 20))
    p.write_bytes(before)
    return p, before


class Server:
    """``pyvmm backend vfio-user`` serving one device on ``sock``; stopped when the test
    ends, whatever happened."""

    def __init__(self, sock: Path, *args: str) -> None:
        self.sock = sock
        self.log = sock.with_name(sock.name + ".log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(pyvmm_cmd("backend", "vfio-user", "--socket",
                                                   str(sock), *args),
                                         stdout=subprocess.DEVNULL, stderr=log)
        if not wait_for_path(sock):
            self.stop()
            pytest.fail(f"vfio-user server did not create {sock}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.unlink(missing_ok=True)


@pytest.fixture
def server(sockdir: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(sockdir / f"s{len(started)}", *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def run_vm(guest: Path, sock: Path, js: Path, *extra: str,
           device: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvmm_cmd("run", "--timeout", "90", "--kernel", str(guest),
                                    "--device", f"vfio-user,socket={sock}{device}",
                                    "--exits-json", str(js), *extra),
                          capture_output=True, text=True, timeout=180)


def bar(rep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in rep["buses"][1]["devices"] if d["name"] == name)


def client(rep: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in rep["devices"] if d["name"] == "vfio-user0")


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_nvme_guest_through_the_client(guests: Path, image: tuple[Path, bytes], server: Any,
                                       chip: str, tmp_path: Path) -> None:
    img, before = image
    s = server("--device", "nvme", "--disk", str(img))
    js = tmp_path / "x.json"
    p = run_vm(guests / "nvme.elf", s.sock, js, "--irqchip", chip)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "nvme model 'pyvmm NVMe'" in p.stdout and "nvme: all passed" in p.stdout
    assert "ok I/O completions by MSI-X" in p.stdout
    s.stop()
    check_image(img, before)  # the server's writes are the guest's data, DMA'd from its RAM
    rep = json.loads(js.read_text())
    c = client(rep)
    assert not c["failed"] and c["dma_maps"] >= 1
    # The two vectors the guest unmasked (admin and I/O CQ) were handed to the server as
    # KVM irqfds (the three it left masked as the VMM's eventfds, for their PBA bits), so
    # the guest's interrupts (it counted them: "irqs admin=.. io=..") were raised by the
    # server writing irqfds: the VMM itself sent no MSI and forwarded none.
    assert c["fast_vectors"] == 2 and c["interrupt_forwards"] == 0
    irqs = p.stdout.split("irqs admin=")[1].split(")")[0]
    admin, io = (int(x) for x in irqs.split(" io="))
    assert admin > 0 and io > 0
    assert rep["irqchip"]["msis_sent"] == 0 and rep["irqchip"]["msis_by_irqfd"] == 0
    # Doorbells are trapped BAR0 writes, counted under the device's name and forwarded.
    bar0 = bar(rep, "vfio-user0.bar0")
    assert bar0["writes"] >= 2 * 40 and c["trapped_writes"] >= bar0["writes"]


def test_nvme_without_irqfds_the_vmm_forwards(guests: Path, image: tuple[Path, bytes],
                                              server: Any, tmp_path: Path) -> None:
    img, before = image
    s = server("--device", "nvme", "--disk", str(img))
    js = tmp_path / "x.json"
    p = run_vm(guests / "nvme.elf", s.sock, js, "--msi", "signal")
    assert p.returncode == 0 and "nvme: all passed" in p.stdout, p.stdout[-2000:] + p.stderr
    s.stop()
    check_image(img, before)
    c = client(json.loads(js.read_text()))
    assert c["fast_vectors"] == 0 and c["interrupt_forwards"] > 0


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_shared_bar_is_a_memslot(guests: Path, server: Any, chip: str, tmp_path: Path) -> None:
    s = server("--device", "pci-testdev")
    js = tmp_path / "x.json"
    p = run_vm(guests / "pci_shmbar.elf", s.sock, js, "--irqchip", chip, "--no-pci-testdev",
               "--cmdline", "dev=2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "pci-shmbar: all passed" in p.stdout
    # The guest wrote and read 4 MiB of BAR4 and moved it: none of it exited here, and
    # the server's device model saw no trapped access either (SHM_TRAPS 0, asked by the
    # guest) — yet it saw the guest's bytes (SHM_SUM) through the same memory.
    rep = json.loads(js.read_text())
    b4 = bar(rep, "vfio-user0.bar4")
    assert b4["reads"] == 0 and b4["writes"] == 0
    c = client(rep)
    assert c["mapped_areas"] == 1 and c["map_failures"] == 0 and not c["failed"]
    assert bar(rep, "vfio-user0.bar0")["reads"] >= 3  # BAR0 registers: trapped, forwarded


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_pci_testdev_guest_through_the_client(guests: Path, server: Any, chip: str,
                                              tmp_path: Path) -> None:
    """The PCI test device guest, unchanged but for its slot: BAR relocation, DMA into
    and out of guest RAM (checked by the guest: memcmp and the device's checksum), and
    interrupts by MSI, MSI-X and INTx, each with masking and pending bits."""
    s = server("--device", "pci-testdev")
    js = tmp_path / "x.json"
    p = run_vm(guests / "pci_testdev.elf", s.sock, js, "--irqchip", chip, "--no-pci-testdev",
               "--cmdline", "dev=2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "ok DMA copy" in p.stdout and "ok DMA checksum" in p.stdout
    assert "ok pending MSI-X delivered on entry unmask" in p.stdout
    assert "pci-testdev: all passed" in p.stdout
    c = client(json.loads(js.read_text()))
    assert not c["failed"]
    assert c["intx_forwards"] >= 2  # INTx: the server's eventfd, pulsed by the VMM
    assert c["interrupt_forwards"] >= 2  # MSI, and MSI-X while masked (→ PBA)


def test_shared_bar_without_mmap_traps(guests: Path, server: Any, tmp_path: Path) -> None:
    """The control: with mapping off the same accesses are messages, and the device
    model counts them (the guest's SHM_TRAPS check fails, as it must)."""
    s = server("--device", "pci-testdev")
    js = tmp_path / "x.json"
    p = run_vm(guests / "pci_shmbar.elf", s.sock, js, "--no-pci-testdev",
               "--cmdline", "dev=2 n=0", device=",mmap=off")
    assert "ok device sees the guest's writes (SHM_SUM)" in p.stdout, p.stdout[-2000:]
    assert "FAIL: no BAR4 access was trapped" in p.stdout and p.returncode != 0
    rep = json.loads(js.read_text())
    b4 = bar(rep, "vfio-user0.bar4")
    assert b4["writes"] >= 4096 and b4["reads"] >= 4096
    assert client(rep)["mapped_areas"] == 0


def test_missing_or_stale_socket_is_one_line(guests: Path, sockdir: Path) -> None:
    stale = sockdir / "stale"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(stale))
    srv.close()  # the file stays, nobody listens
    for sock, says in ((sockdir / "nothing", "does not exist"), (stale, "refuses")):
        p = subprocess.run(pyvmm_cmd("run", "-q", "--kernel", str(guests / "nvme.elf"),
                                     "--device", f"vfio-user,socket={sock}"),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and says in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_a_server_of_another_protocol_is_one_line(guests: Path, image: tuple[Path, bytes],
                                                  sockdir: Path) -> None:
    """A vhost-user backend on the socket: it does not speak vfio-user, the VMM says so
    in one line and the image is untouched."""
    img, before = image
    sock = sockdir / "vu"
    be = subprocess.Popen(pyvmm_cmd("backend", "vhost-user-blk", "--socket", str(sock),
                                    "--disk", str(img)),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_path(sock)
        p = subprocess.run(pyvmm_cmd("run", "-q", "--kernel", str(guests / "nvme.elf"),
                                     "--device", f"vfio-user,socket={sock},timeout=5"),
                           capture_output=True, text=True, timeout=120)
    finally:
        be.terminate()
        be.wait(timeout=20)
    assert p.returncode == 2 and "vfio-user0: vfio-user server" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert img.read_bytes() == before


def test_server_killed_mid_run_vm_goes_on(guests: Path, image: tuple[Path, bytes],
                                          server: Any) -> None:
    """kill -9 of the server while the guest runs its read loop: the device fails (one
    line), the guest's next command gets no completion and the guest says so and
    exits — the VMM never hangs (bounded by the subprocess timeout, not timed)."""
    img, _ = image
    s = server("--device", "nvme", "--disk", str(img))
    vm = subprocess.Popen(pyvmm_cmd("run", "--timeout", "120", "--kernel",
                                    str(guests / "nvme.elf"), "--cmdline", "bench=100000000",
                                    "--device", f"vfio-user,socket={s.sock}"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert vm.stdout is not None
        seen = ""
        for line in vm.stdout:
            seen += line
            if "I/O still works after bad input" in line:
                break
        assert "I/O still works" in seen, seen[-2000:]
        time.sleep(0.2)  # somewhere in the read loop; when exactly does not matter
        s.proc.send_signal(signal.SIGKILL)
        out, err = vm.communicate(timeout=150)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    out = seen + out
    assert "no completion for opcode" in out, out[-2000:] + err[-2000:]
    assert vm.returncode == 3  # the guest's exit(1) on the debug-exit port: it ran on to it
    lines = [ln for ln in err.splitlines() if "vfio-user server" in ln]
    assert len(lines) == 1 and "the device is failed" in lines[0], err
