"""Formatting a comparison result: a rich table, Markdown, JSON and a matplotlib plot.

A result is a dict: ``{"version": 1, "params": {...}, "rows": [row, ...]}``, each row
``{"name", "class", "vmm", "mode", "device", "transport", "status", "reason",
"ops", "metrics": {METRICS...}}`` with status "ok", "skipped" or "failed". rich and
matplotlib are imported only here, by the functions that draw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (  # (metric key, header, format)
    ("exits_per_op", "exits/op", "{:.2f}"),
    ("interrupts_per_op", "irqs/op", "{:.2f}"),
    ("wakeups_per_op", "wakeups/op", "{:.2f}"),
    ("p50_us", "p50 µs", "{:.1f}"),
    ("p99_us", "p99 µs", "{:.1f}"),
    ("throughput_ops_s", "ops/s", "{:.0f}"),
    ("vmm_cpu_us_per_op", "VMM CPU µs/op", "{:.1f}"),
    ("backend_cpu_us_per_op", "backend CPU µs/op", "{:.1f}"),
)
SHORT = {"full emulation": "full", "paravirtual": "para",
         "paravirtual, out of process": "para, out of proc", "assigned": "assigned"}
# The terminal's narrower headers (the Markdown's say the units in full).
TERM_HEAD = {"exits_per_op": "exits", "interrupts_per_op": "irqs", "wakeups_per_op": "wakeups",
             "p50_us": "p50 µs", "p99_us": "p99 µs", "throughput_ops_s": "ops/s",
             "vmm_cpu_us_per_op": "VMM µs", "backend_cpu_us_per_op": "backend µs"}
WORKLOAD = {"disk": "4 KiB random reads, QD1 (warm page cache)",
            "nic": "64-byte ping-pong through a TAP with a host echo",
            "console": "64-byte lines out, each timed until sent"}


def cell(value: float | None, fmt: str) -> str:
    return "n/c" if value is None else fmt.format(value)


def _ok(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["rows"] if r["status"] == "ok"]


def header_lines(result: dict[str, Any]) -> list[str]:
    p = result["params"]
    return [f"{p['rounds']} round(s), medians; ops per run: disk {p['n']}, IDE PIO "
            f"{p['n_pio']}, NIC {p['n_nic']}, console {p.get('n_console', '-')}; every "
            f"per-op number is (run of N - run of "
            f"{p['few']}) / (N - {p['few']}) ({p['few_pio']} for IDE PIO)",
            f"TSC {p['tsc_mhz']:.0f} MHz; host {p['host']}; {p['date']}"]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"_{x}_" for x in header_lines(result)] + [""]
    heads = " | ".join(h for _, h, _ in COLUMNS)
    for cls in result["params"]["classes"]:
        rows = [r for r in result["rows"] if r["class"] == cls]
        if not rows:
            continue
        lines += [f"### {cls}: {WORKLOAD.get(cls, '')}", "",
                  f"| row | VMM | mode | device | transport | {heads} |",
                  "|" + "---|" * (5 + len(COLUMNS))]
        for r in rows:
            lead = f"| {r['name']} | {r['vmm']} | {r['mode']} | {r['device']} | {r['transport']} |"
            if r["status"] == "ok":
                m = r["metrics"]
                lines.append(lead + "".join(f" {cell(m.get(k), f)} |" for k, _, f in COLUMNS))
            else:
                lines.append(lead + f" {r['status']}: {r['reason']} |"
                             + " |" * (len(COLUMNS) - 1))
        lines.append("")
    lines.append("n/c: not counted for this mode (see docs/comparison.md, \"What is counted\").")
    return "\n".join(lines) + "\n"


PAGE_HEAD = """# pyvmm compare: one device class, every mode

Generated — every number below was measured in the run that wrote this page, by

```
{command}
```

(from the repository root, after `make -C guests`; as root, for the NIC rows' TAP).
Each device class runs the same tiny guest workload in every mode pyvmm has for it:
full emulation (the guest's driver programs emulated registers: every access a
trapped exit), paravirtual (virtio: requests in shared rings, notifications by
ioeventfd so no userspace exit), paravirtual out of process (vhost-user: the rings
served by `pyvmm backend`, kicks and interrupts by eventfds between it and KVM) and
assigned (vfio-user: the NVMe controller in `pyvmm backend vfio-user`, its BARs
forwarded, guest RAM mapped by the server, MSI-X by irqfd).

![comparison](img/comparison.png)

"""

PAGE_TAIL = """
## What is counted

- **exits/op**: userspace exits (`--exits-json` "exits", all kinds) of a run of N
  operations minus those of a run of a few, over the difference: boot, the guests' own
  checks and printing fall out.
- **irqs/op**: interrupts per operation — the NVMe guest counts its completion
  interrupts itself (MSI-X, also under QEMU); for virtio the VMM's count of interrupts
  it sent: 0 for virtio-blk and virtio-net, whose tiny guests suppress them and poll
  their used rings (issue 14 item 7), one per buffer for virtio-console, whose guest
  leaves them enabled (and polls all the same); n/c where nothing counts them.
- **wakeups/op**: the VMM's event-loop wakeups for the device — ioeventfd
  notifications it read (virtio), kicks/interrupts it had to forward (vhost-user,
  vfio-user; 0 when the fast path wires the eventfds straight to KVM). Below 1, one
  wakeup served several requests: an eventfd read takes every kick written since the
  last, and a device still draining its ring finds the guest's next request (the
  guest submits as soon as it sees the completion) — it varies from run to run, and
  latency with it. n/c for emulated devices, whose work happens in the vCPU thread's exits.
- **p50/p99 µs**: the guest's own TSC timing of each operation (run of N).
- **ops/s**: the guest's IOPS (blkload) or N - few over the difference of the two runs'
  wall times (`--exits-json` "wall_time_s").
- **VMM CPU µs/op**: the VM's vCPU and other threads (`--exits-json`
  "vcpu_thread_cpu_s" + "off_vcpu_cpu_s"), differenced as above. The vCPU thread's time
  includes the guest's own (it runs natively at CPL3 on this KVM-PVM host, polling).
- **backend CPU µs/op**: the `pyvmm backend` process's CPU while the VM ran
  (/proc/PID/stat, 10 ms ticks), differenced as above.
- QEMU rows (`--with-qemu`): the same guest binaries on QEMU's devices (`-accel kvm`);
  latency, and throughput where the guest prints it; QEMU's exits are not visible
  from outside and its CPU difference drowns in its boot.
- Rows that cannot run on the machine say why instead of numbers.
"""


def markdown_page(result: dict[str, Any]) -> str:
    """docs/comparison.md: what the rows are, the tables, what each column counts."""
    cmd = result["params"].get("command", "pyvmm compare")
    return PAGE_HEAD.format(command=cmd) + markdown(result) + PAGE_TAIL


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=False) + "\n"


def print_table(result: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # A terminal's own width; piped or written to a file, wide enough for every column.
    console = Console(file=file, width=None if file is None and sys.stdout.isatty() else 170)
    for line in header_lines(result):
        console.print(line, style="dim", markup=False, highlight=False)
    console.print("per operation: exits, interrupts, event-loop wakeups, VMM and backend "
                  "CPU µs; n/c: not counted for this mode", style="dim", markup=False,
                  highlight=False)
    for cls in result["params"]["classes"]:
        rows = [r for r in result["rows"] if r["class"] == cls]
        if not rows:
            continue
        t = Table(title=f"{cls}: {WORKLOAD.get(cls, '')}", title_justify="left")
        t.add_column("row", no_wrap=True)
        t.add_column("mode")
        for k, _, _ in COLUMNS:
            t.add_column(TERM_HEAD[k], justify="right", no_wrap=True)
        notes = []
        for r in rows:
            name = r["name"]
            if r["status"] == "ok":
                t.add_row(name, SHORT.get(r["mode"], r["mode"]), *(
                    cell(r["metrics"].get(k), f) for k, _, f in COLUMNS))
            else:
                notes.append(f"  {name}: {r['status']}: {r['reason']}")
        if t.row_count:
            console.print(t)
        else:
            console.print(t.title, markup=False, highlight=False)
        for n in notes:
            console.print(n, style="yellow", markup=False, highlight=False)


def plot(result: dict[str, Any], paths: list[Path]) -> None:
    """Three panels per run: p50 latency, exits per operation and VMM (+ backend) CPU
    per operation, one bar per measured row, written to each of ``paths``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {"full emulation": "#c66", "paravirtual": "#69c",
              "paravirtual, out of process": "#6a6", "assigned": "#a6c"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    panels = (("p50_us", "p50 latency, µs (hatched: QEMU)", "log"),
              ("exits_per_op", "pyvmm: userspace exits per operation", "symlog"),
              ("vmm_cpu_us_per_op", "pyvmm: VMM + backend CPU, µs per operation", "log"))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        # Only rows that counted this metric: a bar of 0 for "not counted" would lie.
        rows = [r for r in _ok(result) if r["metrics"].get(key) is not None]
        vals = []
        for r in rows:
            v = float(r["metrics"][key])
            if key == "vmm_cpu_us_per_op":
                v += r["metrics"].get("backend_cpu_us_per_op") or 0.0
            vals.append(max(v, 1e-3) if scale == "log" else v)
        bars = ax.bar(range(len(rows)), vals,
                      color=[colour.get(r["mode"], "#999") for r in rows])
        for bar, r in zip(bars, rows, strict=True):
            if r["vmm"] != "pyvmm":
                bar.set_hatch("//")
        ax.set_xticks(range(len(rows)), [f"{r['class']}: {r['name']}" for r in rows],
                      rotation=60, ha="right", fontsize=8)
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=10)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colour.values()]
    fig.legend(handles, list(colour), loc="upper right", fontsize=8, ncol=4)
    fig.suptitle("pyvmm compare: the same workload per device class, by mode", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    for p in paths:
        fig.savefig(p, dpi=100)
    plt.close(fig)
