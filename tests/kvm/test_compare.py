"""``pyvmm compare --quick --class disk`` on two fast rows, end to end: the JSON has both
rows measured, every number it reports is positive where the workload must cost
something, and the exits per request are what each mode guarantees — virtio-blk over
virtio-pci notifies by ioeventfd (no userspace exit per request), the emulated NVMe
controller's driver rings an SQ tail and a CQ head doorbell per request (each a
trapped MMIO write) and takes one MSI-X interrupt per completion. Nothing about
timing is asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import pyvmm_cmd


def test_compare_quick_disk_two_rows(guests: Path, tmp_path: Path) -> None:
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    p = subprocess.run(pyvmm_cmd("compare", "--quick", "--class", "disk", "--only",
                                 "virtio-blk-pci,nvme", "--guests", str(guests),
                                 "--json", str(js), "--markdown", str(md)),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(js.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"virtio-blk-pci", "nvme"}
    for r in rows.values():
        assert r["status"] == "ok", r
        m = r["metrics"]
        for k in ("p50_us", "p99_us", "throughput_ops_s", "vmm_cpu_us_per_op"):
            assert m[k] is not None and m[k] > 0, (r["name"], k, m[k])
        assert m["p99_us"] >= m["p50_us"]
    blk, nvme = rows["virtio-blk-pci"]["metrics"], rows["nvme"]["metrics"]
    prm = result["params"]
    # A per-request count is (big run - small run) / (N - few): one event per request
    # in both runs gives exactly 1; at most one per request gives at most N / (N - few).
    most = prm["n"] / (prm["n"] - prm["few"])
    # ioeventfd: the whole run of N requests minus the run of a few has (almost) no
    # userspace exits; a request that exited would give >= 1 here.
    assert blk["exits_per_op"] < 0.1
    # Event-loop wakeups: at most one per request (an eventfd read takes one kick or
    # all written since the last; while the device drains the ring it can find the
    # next request without one, so any number down to ~0 is allowed).
    assert blk["wakeups_per_op"] <= most
    assert blk["interrupts_per_op"] == 0  # blkload polls, interrupts suppressed
    # NVMe: an SQ tail and a CQ head doorbell write per request, each a trapped MMIO
    # write (the margin below 2 is the serial line's few bytes, which differ in length
    # between the two runs); completion interrupts by MSI-X, at most one per request.
    assert nvme["exits_per_op"] >= 1.9
    assert 0 < nvme["interrupts_per_op"] <= most
    assert "| virtio-blk-pci |" in md.read_text() and "| nvme |" in md.read_text()
    assert "virtio-blk-pci" in p.stdout and "nvme" in p.stdout


def test_compare_quick_console_uart_vs_virtio(guests: Path, tmp_path: Path) -> None:
    """A 64-byte line by the UART is 64 THR writes and at least 64 LSR reads, each a
    port exit; by virtio-console one ioeventfd notification and no exit."""
    js = tmp_path / "c.json"
    p = subprocess.run(pyvmm_cmd("compare", "--quick", "--class", "console", "--guests",
                                 str(guests), "--json", str(js)),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(js.read_text())["rows"]}
    assert set(rows) == {"uart", "virtio-console"}
    uart, vcon = rows["uart"]["metrics"], rows["virtio-console"]["metrics"]
    assert rows["uart"]["status"] == rows["virtio-console"]["status"] == "ok"
    assert uart["exits_per_op"] >= 128 - 0.5  # the result line's bytes differ a little
    assert vcon["exits_per_op"] < 0.1
    assert uart["interrupts_per_op"] is None  # the UART row does not count a bystander's
    for m in (uart, vcon):
        assert m["p50_us"] > 0 and m["vmm_cpu_us_per_op"] > 0
