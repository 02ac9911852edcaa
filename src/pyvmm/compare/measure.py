"""Running the rows: ``pyvmm run`` (and ``pyvmm backend``) as subprocesses, twice per row
and round — N operations and a few — so boot, the guests' own checks and start-up fall
out of every per-operation number (the difference of the two runs over N - few).

Sources, all of the run itself: exits, wakeups and interrupts from ``--exits-json``
(or the guest's own interrupt count where it prints one), latency p50/p99 from the
guest's TSC-timed line, throughput from the guest (blkload prints IOPS) or from the
run's wall time, CPU from the children's rusage (the VMM process, and the backend
process after it is stopped).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.compare.rows import Row

BLK = re.compile(r"iops=(\d+) mbps=(\d+) p50_us=(\d+) p99_us=(\d+)")
CYCLES = re.compile(r"(?:nvme-bench reads|ide-bench mode=\w+ reads|e1000-bench rtts|"
                    r"virtio-net-bench rtts|console-bench dev=\w+ lines)=(\d+) "
                    r"p50_cycles=(\d+) p99_cycles=(\d+)")
NVME_IRQS = re.compile(r"irqs admin=\d+ io=(\d+)")
MAC = "52:54:00:aa:bb:01"
ECHO = bytes.fromhex("020000000001")  # the tiny NIC guests' ping destination
ETHERTYPE = 0x88B5  # IEEE local experimental: what the guests' pings carry


@dataclass(frozen=True)
class Sizes:
    """Operations per run (and the few that are subtracted), and rounds."""
    n: int
    n_pio: int
    n_nic: int
    few: int
    few_pio: int
    rounds: int
    n_console: int

    def of(self, row: Row) -> tuple[int, int]:
        if row.workload == "ide-pio":
            return self.n_pio, self.few_pio
        if row.workload == "nic":
            return self.n_nic, self.few
        if row.workload == "console":
            return self.n_console, self.few
        return self.n, self.few


# A UART line is 128 port exits (~10 ms here): the console runs are shorter.
QUICK = Sizes(n=1500, n_pio=8, n_nic=500, few=20, few_pio=2, rounds=1, n_console=200)
FULL = Sizes(n=3000, n_pio=60, n_nic=2000, few=20, few_pio=4, rounds=3, n_console=1000)


class RowFailed(Exception):
    """One row could not be measured: its reason is shown instead of numbers."""


def tsc_hz() -> float:
    """The TSC's rate, calibrated against CLOCK_MONOTONIC by a tiny C program (the
    guests time by their TSC; Python cannot read it)."""
    src = ("#include <stdio.h>\n#include <time.h>\n#include <x86intrin.h>\n"
           "int main(void){struct timespec a,b,s={0,200000000};"
           "clock_gettime(CLOCK_MONOTONIC,&a);unsigned long t0=__rdtsc();nanosleep(&s,0);"
           "unsigned long t1=__rdtsc();clock_gettime(CLOCK_MONOTONIC,&b);"
           "double ns=(b.tv_sec-a.tv_sec)*1e9+(b.tv_nsec-a.tv_nsec);"
           "printf(\"%f\\n\",(t1-t0)/ns*1e9);return 0;}\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RowFailed("no C compiler to calibrate the TSC")
    with tempfile.TemporaryDirectory(prefix="pyvmm-compare-") as d:
        (Path(d) / "t.c").write_text(src)
        subprocess.run([cc, "-O2", "-o", f"{d}/t", f"{d}/t.c"], check=True,
                       capture_output=True)
        return float(subprocess.run([f"{d}/t"], capture_output=True, check=True,
                                    text=True).stdout)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], timeout: float) -> tuple[str, float]:
    """stdout and the CPU seconds (user + system, all threads) of one child."""
    before = _children_cpu()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RowFailed(f"timed out after {timeout:.0f} s") from None
    cpu = _children_cpu() - before
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or [""]
        raise RowFailed(f"{Path(cmd[0]).name} exited {p.returncode}: {tail[0][:160]}")
    return p.stdout, cpu


def _proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextmanager
def _backend(kind: str, sock: Path, img: Path) -> Iterator[list[float]]:
    """A pyvmm backend serving ``img`` on ``sock``; yields a list that gets the CPU
    seconds it spent while the body ran (its start-up and stop are not in it)."""
    if kind == "vhost-user-blk":
        cmd = [sys.executable, "-m", "pyvmm", "backend", "vhost-user-blk", "--socket",
               str(sock), "--disk", str(img)]
    else:
        cmd = [sys.executable, "-m", "pyvmm", "backend", "vfio-user", "--device", "nvme",
               "--disk", str(img), "--socket", str(sock)]
    sock.unlink(missing_ok=True)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not sock.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    cpu: list[float] = []
    try:
        if not sock.exists():
            raise RowFailed(f"pyvmm backend {kind} did not listen")
        before = _proc_cpu(p.pid)
        yield cpu
        cpu.append(_proc_cpu(p.pid) - before)
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()
        sock.unlink(missing_ok=True)


@contextmanager
def echo_tap() -> Iterator[str]:
    """A TAP and a thread that sends each guest ping back (addresses swapped)."""
    name = f"pvcmp{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True,
                   capture_output=True)
    try:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"],
                       check=False, capture_output=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        sock.bind((name, 0))
        sock.settimeout(0.2)
        stop = threading.Event()
        guest = bytes.fromhex(MAC.replace(":", ""))

        def loop() -> None:
            while not stop.is_set():
                try:
                    f = sock.recv(2048)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if f[:6] == ECHO and f[6:12] == guest:
                    sock.send(guest + ECHO + f[12:])

        t = threading.Thread(target=loop, name="compare-echo", daemon=True)
        t.start()
        try:
            yield name
        finally:
            stop.set()
            t.join()
            sock.close()
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def nic_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates a TAP with a host echo)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no ip(8) to create the TAP"
    return None


def _counters(js: dict[str, Any]) -> dict[str, float | None]:
    """What one run's --exits-json says: exits, event-loop wakeups (ioeventfd
    notifications and forwarded kicks/interrupts; None when no device counts them) and
    interrupts the VMM sent (None when it sends none itself)."""
    exits = float(sum(js["exits"].values()))
    wake: float | None = None
    irqs: float | None = None
    for v in js.get("virtio", []):
        wake = (wake or 0.0) + v.get("notifications", 0) + v.get("kick_forwards", 0) \
            + v.get("interrupt_forwards", 0)
        irqs = (irqs or 0.0) + v.get("interrupts", 0)
    for d in js.get("devices", []):
        if d.get("type") == "vfio-user":
            wake = (wake or 0.0) + d.get("interrupt_forwards", 0) + d.get("intx_forwards", 0)
        if d.get("type") == "e1000":
            for key in ("interrupts", "irqs"):
                if key in d:
                    irqs = (irqs or 0.0) + d[key]
    res = js["result"]
    # The VM's own threads from its start to its stop (the vCPU thread's includes the
    # guest's time at CPL3): the interpreter's start-up, which varies by more than a
    # short run costs, is not in it.
    cpu = float(res["vcpu_thread_cpu_s"]) + float(res["off_vcpu_cpu_s"])
    return {"exits": exits, "wakeups": wake, "interrupts": irqs,
            "wall": float(res["wall_time_s"]), "cpu": cpu}


@dataclass
class Env:
    guests: Path
    img: Path
    work: Path
    hz: float
    tap: str | None
    timeout: float


def _guest_args(row: Row, n: int, hz: float) -> str:
    if row.workload == "blkload":
        args = f"mode=0 qd=1 bs=4096 n={n} tsc_khz={int(hz / 1000)}"
    else:
        args = f"bench={n}"
    return f"{args} {row.cmdline}".strip()


def run_once(row: Row, env: Env, n: int) -> dict[str, Any]:
    """One run of ``n`` operations: its guest output, counters and CPU."""
    kernel = env.guests / row.guest
    sock = env.work / "backend.sock"
    js = env.work / "exits.json"
    js.unlink(missing_ok=True)
    if row.vmm == "QEMU":
        qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        dev = [a.format(img=env.img, tap=env.tap, mac=MAC) for a in row.qemu_dev]
        # Its CPU is not reported: the difference of two runs drowns in its boot
        # (SeaBIOS in KVM's instruction emulator here, seconds that vary by more than
        # the workload costs); nor are its exits, which are not visible from outside.
        out, _ = _run([qemu, "-accel", "kvm", "-cpu", "host,arch-capabilities=off",
                         "-M", row.machine, "-m", "64", "-nodefaults", "-nographic",
                         "-serial", "stdio", "-monitor", "none", "-no-reboot", "-device",
                         "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(kernel),
                         "-append", _guest_args(row, n, env.hz), *dev], env.timeout)
        # The guests end by an i8042 reset, which -no-reboot turns into exit 0.
        return {"out": out, "cpu": None, "backend_cpu": None, "exits": None,
                "wakeups": None, "interrupts": None, "wall": None}
    cmd = [sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", str(int(env.timeout)),
           "--no-pci-testdev", "--kernel", str(kernel), "--cmdline",
           _guest_args(row, n, env.hz), "--exits-json", str(js)]
    if row.disk:
        cmd += ["--disk", row.disk.format(img=env.img, sock=sock)]
    if row.device_arg:
        cmd += ["--device", row.device_arg.format(img=env.img, sock=sock)]
    if row.workload == "nic":
        cmd += ["--net", f"tap={env.tap}{row.net},mac={MAC}"]
    if row.console:
        cmd += ["--console", row.console.format(work=env.work)]
    if row.backend:
        with _backend(row.backend, sock, env.img) as bcpu:
            out, _ = _run(cmd, env.timeout)
        backend_cpu: float | None = bcpu[0]
    else:
        out, _ = _run(cmd, env.timeout)
        backend_cpu = None
    rec: dict[str, Any] = {"out": out, "backend_cpu": backend_cpu}
    rec.update(_counters(json.loads(js.read_text())))
    if not row.count_virtio:  # the machine's virtio devices are not this row's device
        rec["wakeups"] = rec["interrupts"] = None
    return rec


def _latency_tput(row: Row, out: str, hz: float) -> tuple[float, float, float | None]:
    """p50 µs, p99 µs, and the guest's own throughput (ops/s) if it prints one."""
    if row.workload == "blkload":
        m = BLK.search(out)
        if not m:
            raise RowFailed("no blkload result line in the guest's output")
        return float(m.group(3)), float(m.group(4)), float(m.group(1))
    c = CYCLES.search(out)
    if not c:
        raise RowFailed("no bench result line in the guest's output")
    return int(c.group(2)) / hz * 1e6, int(c.group(3)) / hz * 1e6, None


def _per(a: float | None, b: float | None, ops: int) -> float | None:
    return None if a is None or b is None else (a - b) / ops


def measure_round(row: Row, env: Env, sizes: Sizes,
                  step: Callable[[], None]) -> dict[str, float | None]:
    n, few = sizes.of(row)
    big = run_once(row, env, n)
    step()
    small = run_once(row, env, few)
    step()
    ops = n - few
    p50, p99, tput = _latency_tput(row, big["out"], env.hz)
    if row.workload == "nvme":  # the guest counts its I/O completion interrupts itself
        irq = [NVME_IRQS.search(r["out"]) for r in (big, small)]
        if irq[0] and irq[1]:
            big["interrupts"], small["interrupts"] = (float(m.group(1)) for m in irq
                                                      if m is not None)
    if tput is None and big["wall"] is not None and big["wall"] > small["wall"]:
        tput = ops / (big["wall"] - small["wall"])
    cpu = _per(big["cpu"], small["cpu"], ops)
    return {
        "exits_per_op": _per(big["exits"], small["exits"], ops),
        "interrupts_per_op": _per(big["interrupts"], small["interrupts"], ops),
        "wakeups_per_op": _per(big["wakeups"], small["wakeups"], ops),
        "p50_us": p50, "p99_us": p99, "throughput_ops_s": tput,
        "vmm_cpu_us_per_op": None if cpu is None else cpu * 1e6,
        "backend_cpu_us_per_op": (None if big["backend_cpu"] is None else
                                  (big["backend_cpu"] - small["backend_cpu"]) / ops * 1e6),
    }


METRICS = ("exits_per_op", "interrupts_per_op", "wakeups_per_op", "p50_us", "p99_us",
           "throughput_ops_s", "vmm_cpu_us_per_op", "backend_cpu_us_per_op")


def median_metrics(rounds: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in METRICS:
        vals = [r[k] for r in rounds if r[k] is not None]
        out[k] = statistics.median(vals) if vals else None  # type: ignore[type-var]
    return out


def unavailable(row: Row, guests: Path) -> str | None:
    """Why ``row`` cannot run on this host, or None."""
    if row.reason:
        return row.reason
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    if not (guests / row.guest).exists():
        return f"guest {row.guest} not built (make -C guests)"
    if row.vmm == "QEMU" and shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    if row.workload == "nic":
        return nic_unavailable()
    return None
