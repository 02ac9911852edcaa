"""pyvmm's own VM with a virtio-blk device that lives in another process: the tiny
virtio-blk guest against pyvmm's vhost-user backend and against qemu-storage-daemon,
over virtio-pci (kicks by KVM's ioeventfd and interrupts by the MSI-X vector's irqfd,
both handed to the backend: no VMM thread per request) and virtio-mmio (kicks handed
over, interrupts forwarded by the VMM), on both irqchips. The host reads back what the
guest wrote. Also: a socket that is not there, and a backend killed mid-run."""

from __future__ import annotations

import json
import os
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
from tests.kvm.test_virtio import pattern, sector0_sum, tsc_khz

QSD = shutil.which("qemu-storage-daemon")
KINDS = ["pyvmm", pytest.param("qsd", marks=pytest.mark.skipif(
    QSD is None, reason="qemu-storage-daemon is not installed"))]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="pyvmm-vu-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(1 << 20))
    return p


class Backend:
    """A vhost-user-blk backend process serving ``image`` on ``sock``; stopped (and its
    socket gone) when the test ends, whatever happened."""

    def __init__(self, kind: str, sock: Path, image: Path) -> None:
        if kind == "pyvmm":
            cmd = pyvmm_cmd("backend", "vhost-user-blk", "--socket", str(sock), "--disk",
                            str(image))
        else:
            assert QSD is not None
            cmd = [QSD, "--blockdev", f"driver=file,node-name=f,filename={image}",
                   "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                   f"addr.path={sock},writable=on"]
        self.kind, self.sock = kind, sock
        self.log = sock.with_name(f"{sock.name}.{time.monotonic_ns()}.log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        if not wait_for_path(sock):
            self.stop()
            pytest.fail(f"{kind} backend did not create {sock}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.unlink(missing_ok=True)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    try:
        yield started
    finally:
        for b in started:
            b.stop()


def run(guest: Path, *args: str, chip: str = "kernel", timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvmm_cmd("run", "--timeout", str(timeout), "--irqchip", chip,
                                    "--kernel", str(guest), *args),
                          capture_output=True, text=True, timeout=timeout + 60)


def frontend_report(js: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    rep = json.loads(js.read_text())
    (v,) = rep["virtio"]
    return rep, v


def device_regs(rep: dict[str, Any]) -> dict[str, Any]:
    return next(d for b in rep["buses"] for d in b["devices"]
                if d["name"].startswith("virtio") and not d["name"].endswith(".bar1"))


@pytest.mark.parametrize("chip", ["kernel", "split"])
@pytest.mark.parametrize("transport", ["pci", "mmio"])
@pytest.mark.parametrize("kind", KINDS)
def test_blk_guest_against_a_backend_process(guests: Path, image: Path, tmp_path: Path,
                                             sockdir: Path, backends: list[Backend],
                                             kind: str, transport: str, chip: str) -> None:
    before = image.read_bytes()
    sock = sockdir / "blk.sock"
    backends.append(Backend(kind, sock, image))
    js = tmp_path / "x.json"
    mmio = int(transport == "mmio")
    p = run(guests / "virtio_blk.elf", "--disk",
            f"if=vhost-user,socket={sock},transport={transport}",
            "--cmdline", f"seed=9 mmio={mmio} msix={1 - mmio}", "--exits-json", str(js),
            chip=chip)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"sector0 sum={sector0_sum(before):x}" in p.stdout  # host -> guest
    assert "ok write/flush/read-back" in p.stdout and "read past the end -> IOERR" in p.stdout
    assert ("id=pyvmm-vu0" if kind == "pyvmm" else "id=vhost_user_blk") in p.stdout
    after = image.read_bytes()  # guest -> host, and nothing else changed
    assert after[8 * 512:16 * 512] == pattern(9)
    assert after[:8 * 512] == before[:8 * 512] and after[16 * 512:] == before[16 * 512:]
    rep, v = frontend_report(js)
    assert v["needs_reset"] == 0 and v["bugs"] == 0 and v["backend_errors"] == 0
    assert v["notifications"] == 0  # the VMM saw no kick: KVM's ioeventfd went to the backend
    assert v["kick_forwards"] == 0 and v["fast_kicks"] == 1
    notify = range(0x3000, 0x4000) if transport == "pci" else range(0x50, 0x54)
    assert not [a for a in device_regs(rep)["accesses"] if a["offset"] in notify]
    if transport == "pci":
        # MSI-X vector 0's irqfd was the backend's call fd: interrupts went backend ->
        # KVM -> guest, none through the VMM, and the guest received them.
        assert v["fast_interrupts"] == 1 and v["interrupt_forwards"] == 0
        assert v["interrupts"] == 0
        irqs = int(p.stdout.split("msix irqs=")[1].split()[0])
        assert irqs >= 6  # one per request (libvhost-user also signals once at SET_VRING_CALL)
    else:
        # virtio-mmio's InterruptStatus needs the VMM: it forwards every interrupt (one
        # wake-up may carry several: they add up in the eventfd).
        assert v["fast_interrupts"] == 0 and v["interrupt_forwards"] >= 1
        assert v["interrupts"] == v["interrupt_forwards"]


def test_fast_path_off_forwards_every_kick_and_interrupt(guests: Path, image: Path,
                                                        tmp_path: Path, sockdir: Path,
                                                        backends: list[Backend]) -> None:
    """fast_path=off on virtio-pci: the same guest passes, and the counters show the VMM
    woke for each request (the comparison the fast path is measured against)."""
    sock = sockdir / "blk.sock"
    backends.append(Backend("pyvmm", sock, image))
    js = tmp_path / "x.json"
    p = run(guests / "virtio_blk.elf", "-q", "--disk",
            f"if=vhost-user,socket={sock},fast_path=off", "--cmdline", "seed=3 msix=1",
            "--exits-json", str(js))
    assert p.returncode == 0, p.stdout + p.stderr
    assert image.read_bytes()[8 * 512:16 * 512] == pattern(3)
    _, v = frontend_report(js)
    assert v["fast_kicks"] == v["fast_interrupts"] == 0
    assert v["kick_forwards"] == v["notifications"] == 6  # one per request
    assert v["interrupt_forwards"] >= 1 and v["interrupts"] == v["interrupt_forwards"]


def test_intx_guest_gets_forwarded_interrupts(guests: Path, image: Path, tmp_path: Path,
                                              sockdir: Path, backends: list[Backend]) -> None:
    """Without MSI-X the queue interrupt is INTx with the ISR byte, which the VMM must
    set: kicks still go straight to the backend, interrupts are forwarded."""
    sock = sockdir / "blk.sock"
    backends.append(Backend("pyvmm", sock, image))
    js = tmp_path / "x.json"
    p = run(guests / "virtio_blk.elf", "-q", "--disk", f"if=vhost-user,socket={sock}",
            "--cmdline", "seed=4", "--exits-json", str(js))
    assert p.returncode == 0, p.stdout + p.stderr
    _, v = frontend_report(js)
    assert v["fast_kicks"] == 1 and v["kick_forwards"] == 0
    assert v["fast_interrupts"] == 0 and v["interrupt_forwards"] >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_qd32_no_per_request_exits_or_vmm_wakeups(guests: Path, tmp_path: Path,
                                                   sockdir: Path, backends: list[Backend],
                                                   kind: str) -> None:
    """blkload at QD32 over vhost-user: exits do not grow with requests and the VMM
    forwards nothing (blkload polls with interrupts suppressed; kicks are KVM's)."""
    n = 10000
    img = tmp_path / "load.img"
    img.write_bytes(os.urandom(4 << 20))
    sock = sockdir / "blk.sock"
    backends.append(Backend(kind, sock, img))
    js = tmp_path / "x.json"
    p = run(guests / "blkload.elf", "-q", "--disk", f"if=vhost-user,socket={sock}",
            "--cmdline", f"mode=0 qd=32 n={n} tsc_khz={tsc_khz()}", "--exits-json", str(js))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"blkload mode=0 qd=32 bs=4096 n={n}" in p.stdout
    rep, v = frontend_report(js)
    assert sum(rep["exits"].values()) / n <= 0.05
    assert device_regs(rep)["reads"] + device_regs(rep)["writes"] < 60  # setup only
    assert v["kick_forwards"] == v["notifications"] == 0 and v["fast_kicks"] == 1
    # blkload uses no MSI-X (INTx: forwarded) and suppresses interrupts; libvhost-user
    # signals a call fd once when it is set ("in case of I/O hang after reconnecting").
    assert v["interrupt_forwards"] == (0 if kind == "pyvmm" else 1)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_socket_not_there_is_one_line(guests: Path, sockdir: Path) -> None:
    p = run(guests / "hello.elf", "--disk", f"if=vhost-user,socket={sockdir / 'none.sock'}")
    assert "does not exist" in one_line_error(p)


def test_socket_nobody_listens_on_is_one_line(guests: Path, sockdir: Path) -> None:
    """A stale socket file (its server gone): connecting is refused."""
    path = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    p = run(guests / "hello.elf", "-q", "--device", f"vhost-user-blk,socket={path}")
    assert "refuses connections" in one_line_error(p)


def test_backend_that_never_answers_is_one_line(guests: Path, sockdir: Path) -> None:
    """A listener that accepts and says nothing: the handshake's wait is bounded."""
    path = sockdir / "mute.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    try:
        t0 = time.monotonic()
        p = run(guests / "hello.elf", "-q", "--disk", f"if=vhost-user,socket={path},timeout=1")
        line = one_line_error(p)
    finally:
        s.close()
    assert "no answer to GET_FEATURES within 1 s" in line
    assert time.monotonic() - t0 < 30


def wait_until_written(img: Path, vm: subprocess.Popen[str], timeout: float = 60) -> bool:
    """Until the guest's first write (blkload's pattern: byte 1 is 7) is in the image, or
    the VM ended; True if it is there and the VM still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and vm.poll() is None:
        with img.open("rb") as f:
            if f.read(16) != bytes(16):
                return vm.poll() is None
        time.sleep(0.005)
    return False


def test_backend_killed_mid_run_the_vm_goes_on(guests: Path, tmp_path: Path, sockdir: Path,
                                               backends: list[Backend]) -> None:
    """SIGKILL the backend while the guest has requests in flight: the VMM sees the
    socket's HUP on its event loop, logs it once, sets DEVICE_NEEDS_RESET; the guest
    (which polls for completions that never come) runs until --timeout."""
    img = tmp_path / "load.img"
    img.write_bytes(bytes(16 << 20))
    sock = sockdir / "blk.sock"
    b = Backend("pyvmm", sock, img)
    backends.append(b)
    js = tmp_path / "x.json"
    vm = subprocess.Popen(pyvmm_cmd("run", "--timeout", "8", "--kernel",
                                    str(guests / "blkload.elf"), "--disk",
                                    f"if=vhost-user,socket={sock}", "--cmdline",
                                    f"mode=2 qd=4 bs=262144 n=65536 tsc_khz={tsc_khz()}",
                                    "--exits-json", str(js)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Killed as soon as the first write lands: 16 GiB of writes are still to come,
        # however fast this machine is (a fixed sleep raced a guest that had finished).
        assert wait_until_written(img, vm), vm.communicate()
        b.proc.send_signal(signal.SIGKILL)
        out, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    assert vm.returncode == 124, out + err  # ended by --timeout, not hung, not crashed
    assert "blkload mode=2" not in out  # the guest did not finish
    lost = [ln for ln in err.splitlines() if "closed the connection" in ln]
    assert len(lost) == 1, err
    assert "DEVICE_NEEDS_RESET" in lost[0]
    rep, v = frontend_report(js)
    assert v["connected"] == 0 and v["needs_reset"] == 1 and v["backend_errors"] == 1
    assert v["bugs"] == 0 and rep["event_loop"]["bugs"] == 0


def test_net_guest_through_pyvmms_switch_backend(guests: Path, tap: str, sockdir: Path,
                                                 tmp_path: Path) -> None:
    """vhost-user-net: the tiny virtio-net guest's frame leaves through pyvmm's
    vhost-user-net backend (a switch port, uplinked to a TAP the test reads), and
    frames written to the TAP come back to it — the VMM keeps the config space (MAC)."""
    from tests.kvm.test_virtio_net import ETH_P_EXP, csum

    path = sockdir / "net.sock"
    be = subprocess.Popen(pyvmm_cmd("backend", "vhost-user-net", "--socket", str(path),
                                    "--tap", tap), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_EXP))
    vm = None
    try:
        assert wait_for_path(path)
        raw.bind((tap, 0))
        raw.settimeout(30)
        js = tmp_path / "x.json"
        vm = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "60", "--kernel",
                                        str(guests / "virtio_net.elf"), "--net",
                                        f"model=vhost-user,socket={path},mac=52:54:00:aa:bb:cd",
                                        "--cmdline", "seed=32", "--exits-json", str(js)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        frame = raw.recv(65536)  # guest -> backend -> switch -> TAP
        assert frame[6:12] == bytes.fromhex("525400aabbcd")
        assert frame[14:].rstrip(b"\0") == b"pyvmm-tx 32"
        payloads = [b"hello-guest", os.urandom(4000), b"pyvmm-end"]
        for pl in payloads:  # TAP -> switch (the guest's MAC is learned) -> guest
            raw.send(frame[6:12] + bytes.fromhex("020000000001") + b"\x88\xb5" + pl)
        out, err = vm.communicate(timeout=60)
    finally:
        raw.close()
        if vm is not None and vm.poll() is None:
            vm.kill()
            vm.wait()
        be.terminate()
        be.wait(timeout=20)
        if be.stderr is not None:
            be.stderr.close()
    assert vm.returncode == 0, out + err
    assert "virtio-net mac=52:54:00:aa:bb:cd" in out
    rx = [ln for ln in out.splitlines() if ln.startswith("rx ")]
    assert len(rx) == 3
    for ln, pl in zip(rx, payloads, strict=True):
        assert f"len={14 + len(pl)} " in ln and f"sum={csum(pl):x} " in ln
    _, v = frontend_report(js)
    assert v["fast_kicks"] == 2 and v["kick_forwards"] == 0 and v["needs_reset"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_backend_restarted_mid_run_the_rings_resume(guests: Path, tmp_path: Path,
                                                    sockdir: Path, backends: list[Backend],
                                                    kind: str) -> None:
    """reconnect=20: the backend is SIGKILLed with writes in flight and a new one starts
    on the same socket; the front end reconnects (bounded back-off), hands the successor
    the same rings from the used index in guest memory (and, where negotiated, the
    inflight region), and the guest — which fails on any error status — finishes every
    request. The host finds the whole image written."""
    bs, n = 262144, 65536  # 16 GiB of writes: the kill lands long before the end
    img = tmp_path / "load.img"
    img.write_bytes(bytes(16 << 20))
    sock = sockdir / "blk.sock"
    first = Backend(kind, sock, img)
    backends.append(first)
    js = tmp_path / "x.json"
    vm = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "90", "--kernel",
                                    str(guests / "blkload.elf"), "--disk",
                                    f"if=vhost-user,socket={sock},reconnect=20", "--cmdline",
                                    f"mode=2 qd=4 bs={bs} n={n} tsc_khz={tsc_khz()}",
                                    "--exits-json", str(js)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until_written(img, vm), vm.communicate()  # booted and writing
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        first.stop()  # removes the stale socket, so the successor's is the one waited for
        time.sleep(0.5)
        backends.append(Backend(kind, sock, img))  # the successor, same socket and image
        out, err = vm.communicate(timeout=120)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    assert vm.returncode == 0, out + err
    assert f"blkload mode=2 qd=4 bs={bs} n={n}" in out  # every request came back OK
    assert err.count("reconnecting for up to 20 s") == 1 and err.count("is back") == 1, err
    rep, v = frontend_report(js)
    assert v["reconnects"] == 1 and v["connected"] == 1 and v["needs_reset"] == 0
    assert v["bugs"] == 0 and rep["event_loop"]["bugs"] == 0
    assert v["kick_forwards"] == 0 and v["fast_kicks"] == 1  # the same ioeventfd, handed on
    # With pyvmm's backend the successor also reads the inflight region and serves what
    # its predecessor had taken and not completed first ("serving N request(s) a
    # previous back end left in flight" in its log, when the kill lands mid-request;
    # tests/unit/test_vhost_user_inflight.py shows that part exactly).
    chunk = bytes((i * 7) & 0xFF for i in range(bs))
    assert img.read_bytes() == chunk * ((16 << 20) // bs)
