"""pyvmm compare's formatting from a recorded result (terminal table, Markdown, JSON),
its reading of a run's --exits-json and guest output, and its bad options: one line,
the config exit code, nothing run and no file written."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest

from pyvmm.cli import EXIT_CONFIG, main
from pyvmm.compare import ROWS, measure, report
from pyvmm.compare.rows import CLASSES

RECORDED: dict[str, Any] = {
    "version": 1,
    "params": {"quick": True, "classes": ["disk", "console"], "n": 1500, "n_pio": 8,
               "n_nic": 500, "few": 20, "few_pio": 2, "rounds": 1, "tsc_mhz": 2246.0,
               "host": "x86_64 2 CPUs, Linux 6.1", "date": "2026-12-02 05:03 UTC"},
    "rows": [
        {"name": "virtio-blk-pci", "class": "disk", "vmm": "pyvmm", "mode": "paravirtual",
         "device": "virtio-blk", "transport": "virtio-pci (ioeventfd)", "ops": 1500,
         "status": "ok", "reason": "",
         "metrics": {"exits_per_op": 0.0013, "interrupts_per_op": 0.0,
                     "wakeups_per_op": 0.72, "p50_us": 85.0, "p99_us": 3195.0,
                     "throughput_ops_s": 8324.0, "vmm_cpu_us_per_op": 126.23,
                     "backend_cpu_us_per_op": None}},
        {"name": "nvme", "class": "disk", "vmm": "pyvmm", "mode": "full emulation",
         "device": "NVMe", "transport": "PCI BAR doorbells, MSI-X", "ops": 1500,
         "status": "ok", "reason": "",
         "metrics": {"exits_per_op": 2.0135, "interrupts_per_op": 1.0,
                     "wakeups_per_op": None, "p50_us": 170.61, "p99_us": 238.1,
                     "throughput_ops_s": 4104.4, "vmm_cpu_us_per_op": 181.5,
                     "backend_cpu_us_per_op": None}},
        {"name": "ide-pio", "class": "disk", "vmm": "pyvmm", "mode": "full emulation",
         "device": "IDE/ATA", "transport": "ports, PIO", "ops": 8, "status": "failed",
         "reason": "timed out after 300 s", "metrics": {}},
        {"name": "uart", "class": "console", "vmm": "pyvmm", "mode": "full emulation",
         "device": "16550A UART", "transport": "ports", "ops": 1500, "status": "skipped",
         "reason": "no timed console workload", "metrics": {}},
    ],
}


def md_rows(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| row "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


def test_markdown_has_one_row_per_result_with_its_numbers_and_reasons() -> None:
    text = report.markdown(RECORDED)
    rows = md_rows(text)
    assert set(rows) == {"virtio-blk-pci", "nvme", "ide-pio", "uart"}
    heads = [h for _, h, _ in report.COLUMNS]
    blk = dict(zip(heads, rows["virtio-blk-pci"][5:], strict=True))
    assert blk["exits/op"] == "0.00" and blk["wakeups/op"] == "0.72"
    assert blk["p50 µs"] == "85.0" and blk["ops/s"] == "8324"
    assert blk["backend CPU µs/op"] == "n/c"  # None is "not counted", never 0
    nvme = dict(zip(heads, rows["nvme"][5:], strict=True))
    assert nvme["exits/op"] == "2.01" and nvme["irqs/op"] == "1.00"
    assert nvme["wakeups/op"] == "n/c"
    assert "failed: timed out after 300 s" in rows["ide-pio"]
    assert "skipped: no timed console workload" in rows["uart"]
    # every table line has the same number of cells as its header
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.count("|") == 5 + len(report.COLUMNS) + 1, line
    assert "### disk:" in text and "### console:" in text
    assert "1500" in text and "2246 MHz" in text


def test_markdown_page_names_its_command_and_its_columns() -> None:
    rec = copy.deepcopy(RECORDED)
    rec["params"]["command"] = "pyvmm compare --quick --class disk"
    page = report.markdown_page(rec)
    assert "pyvmm compare --quick --class disk" in page
    assert report.markdown(rec) in page and "## What is counted" in page


def test_json_round_trips_the_result() -> None:
    assert json.loads(report.to_json(RECORDED)) == RECORDED


def test_terminal_table_shows_rows_values_and_reasons() -> None:
    buf = io.StringIO()
    report.print_table(RECORDED, file=buf)
    text = buf.getvalue()
    for needle in ("virtio-blk-pci", "nvme", "2.01", "8324", "170.6", "n/c",
                   "ide-pio: failed: timed out after 300 s",
                   "uart: skipped: no timed console workload"):
        assert needle in text, needle


def test_plot_writes_png_and_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (a dev extra) is not installed")
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"
    report.plot(RECORDED, [png, svg])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]


def test_from_json_writes_the_outputs_of_a_recorded_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, md, js = tmp_path / "in.json", tmp_path / "out.md", tmp_path / "out.json"
    src.write_text(report.to_json(RECORDED))
    assert main(["compare", "--from-json", str(src), "--markdown", str(md),
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text()) == RECORDED
    assert report.markdown(RECORDED) in md.read_text()
    assert "virtio-blk-pci" in capsys.readouterr().out


def test_counters_read_from_an_exits_json() -> None:
    js = {"exits": {"io": 150, "mmio": 60},
          "result": {"wall_time_s": 1.5, "vcpu_thread_cpu_s": 0.25, "off_vcpu_cpu_s": 0.5},
          "virtio": [{"notifications": 7, "interrupts": 3, "kick_forwards": 2,
                      "interrupt_forwards": 1}],
          "devices": [{"type": "vfio-user", "interrupt_forwards": 4, "intx_forwards": 1}]}
    c = measure._counters(js)
    assert c == {"exits": 210.0, "wakeups": 15.0, "interrupts": 3.0, "wall": 1.5,
                 "cpu": 0.75}
    bare = measure._counters({"exits": {"io": 1}, "result": js["result"]})
    assert bare["wakeups"] is None and bare["interrupts"] is None  # not counted, not 0


def test_guest_lines_give_latency_in_microseconds() -> None:
    blk = next(r for r in ROWS if r.name == "virtio-blk-pci")
    nvme = next(r for r in ROWS if r.name == "nvme")
    out = "blkload mode=0 qd=1 bs=4096 n=9 iops=5741 mbps=23 p50_us=95 p99_us=4067\n"
    assert measure._latency_tput(blk, out, 1e9) == (95.0, 4067.0, 5741.0)
    out = "nvme-bench reads=100 p50_cycles=2000 p99_cycles=5000\n"
    assert measure._latency_tput(nvme, out, 1e9) == (2.0, 5.0, None)
    with pytest.raises(measure.RowFailed):
        measure._latency_tput(nvme, "FAIL 3\n", 1e9)


def test_medians_skip_what_was_not_counted() -> None:
    rounds: list[dict[str, float | None]] = [dict.fromkeys(measure.METRICS, None)
                                             for _ in range(3)]
    for r, v in zip(rounds, (1.0, 5.0, 2.0), strict=True):
        r["p50_us"] = v
    m = measure.median_metrics(rounds)
    assert m["p50_us"] == 2.0 and m["exits_per_op"] is None


def test_rows_cover_every_class_and_have_unique_names() -> None:
    assert {r.cls for r in ROWS} == set(CLASSES)
    assert len({r.name for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("args", "says"), [
    (["--class", "disk,floppy"], "--class disk,floppy: unknown class floppy"),
    (["--only", "virtio-blk-pci,nope"], "--only virtio-blk-pci,nope: unknown row nope"),
    (["--class", "nic", "--only", "nvme"], "none of these rows is in --class nic"),
    (["--json", "{missing}/r.json"], "no such directory"),
    (["--markdown", "{missing}/r.md"], "no such directory"),
    (["--plot", "{missing}/r.png"], "no such directory"),
    (["--plot", "{tmp}/r.pdf"], "must end in .png or .svg"),
    (["--json", "{tmp}/r.txt"], "must end in .json"),
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--ops", "5000"], "--ops 5000: must be from"),
    (["--from-json", "{tmp}/absent.json"], "--from-json"),
])
def test_bad_options_are_one_line_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        says: str) -> None:
    missing = tmp_path / "no" / "such"
    argv = ["compare", "--quick", "--class", "console",
            *[a.format(missing=missing, tmp=tmp_path) for a in args]]
    before = copy.deepcopy(sorted(p.name for p in tmp_path.iterdir()))
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyvmm: error: ") and says in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not missing.parent.exists()
