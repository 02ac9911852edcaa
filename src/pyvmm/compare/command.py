"""``pyvmm compare``: its options, their checks (before anything runs or is written)
and the run with a progress bar."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pyvmm.compare.rows import CLASSES, ROWS, Row
from pyvmm.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer operations and one round (under 5 minutes on 2 cores)")
    p.add_argument("--class", dest="classes", default=",".join(CLASSES), metavar="LIST",
                   help="device classes, comma-separated: " + ", ".join(CLASSES))
    p.add_argument("--only", metavar="ROW,...", help="only these rows: "
                   + ", ".join(r.name for r in ROWS))
    p.add_argument("--with-qemu", action="store_true",
                   help="add QEMU's rows for the devices QEMU has (latency, throughput)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--plot", metavar="PATH", action="append", default=[],
                   help="write a plot (.png or .svg; repeatable)")
    p.add_argument("--guests", metavar="DIR", default="guests/out",
                   help="where the tiny guests are built (default guests/out)")
    p.add_argument("--from-json", metavar="PATH", help="measure nothing: print and write "
                   "the outputs of a result an earlier --json wrote")
    p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    p.add_argument("--ops", type=int, metavar="N", help="operations per run for disks, NICs "
                   "and consoles (default 3000 / 2000 / 1000, --quick 1500 / 500 / 200; "
                   "the guests take at most 4096)")
    p.add_argument("--ops-pio", type=int, metavar="N",
                   help="operations per IDE PIO run (default 60, --quick 8)")


def _out_path(opt: str, text: str | None, suffixes: tuple[str, ...] = ()) -> Path | None:
    if text is None:
        return None
    p = Path(text)
    if suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"--{opt} {text}: must end in {' or '.join(suffixes)}")
    if not p.parent.is_dir():
        raise ConfigError(f"--{opt} {text}: no such directory {str(p.parent)!r}")
    if p.is_dir():
        raise ConfigError(f"--{opt} {text}: is a directory")
    return p


def select(a: argparse.Namespace) -> list[Row]:
    classes = [c for c in a.classes.split(",") if c]
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes:
        raise ConfigError(f"--class {a.classes}: unknown class "
                          f"{', '.join(bad) or '(none)'} (one of {', '.join(CLASSES)})")
    rows = [r for r in ROWS if r.cls in classes and (a.with_qemu or r.vmm == "pyvmm")]
    if a.only:
        names = [n for n in a.only.split(",") if n]
        known = {r.name for r in ROWS}
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ConfigError(f"--only {a.only}: unknown row {', '.join(unknown) or '(none)'}"
                              f" (one of {', '.join(sorted(known))})")
        rows = [r for r in ROWS if r.name in names and r.cls in classes]
        if not rows:
            raise ConfigError(f"--only {a.only}: none of these rows is in --class "
                              f"{a.classes}")
    return rows


def run(a: argparse.Namespace) -> int:
    from pyvmm.compare import measure

    rows = select(a)
    if a.rounds is not None and a.rounds < 1:
        raise ConfigError(f"--rounds {a.rounds}: must be at least 1")
    json_path = _out_path("json", a.json, (".json",))
    md_path = _out_path("markdown", a.markdown, (".md",))
    plots = [p for p in (_out_path("plot", t, (".png", ".svg")) for t in a.plot)
             if p is not None]
    if plots and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)")
    if a.from_json:
        try:
            recorded = json.loads(Path(a.from_json).read_text())
            if not isinstance(recorded, dict) or recorded.get("version") != 1:
                raise ValueError("not a pyvmm compare result (version 1)")
        except (OSError, ValueError) as e:
            raise ConfigError(f"--from-json {a.from_json}: {e}") from None
        return _write(recorded, json_path, md_path, plots)
    guests = Path(a.guests)
    base = measure.QUICK if a.quick else measure.FULL
    for opt, v, least in (("ops", a.ops, base.few + 1), ("ops-pio", a.ops_pio,
                                                         base.few_pio + 1)):
        if v is not None and not least <= v <= 4096:
            raise ConfigError(f"--{opt} {v}: must be from {least} (more than the few "
                              "subtracted) to 4096 (the guests' limit)")
    sizes = measure.Sizes(**{**base.__dict__, "rounds": a.rounds or base.rounds,
                             "n": a.ops or base.n, "n_nic": a.ops or base.n_nic,
                             "n_console": a.ops or base.n_console,
                             "n_pio": a.ops_pio or base.n_pio})
    classes = [c for c in CLASSES if c in a.classes.split(",")]
    result: dict[str, Any] = {"version": 1, "rows": [], "params": {
        "quick": a.quick, "classes": classes, "n": sizes.n, "n_pio": sizes.n_pio,
        "n_nic": sizes.n_nic, "n_console": sizes.n_console, "few": sizes.few,
        "few_pio": sizes.few_pio,
        "rounds": sizes.rounds, "tsc_mhz": 0.0, "host": f"{platform.machine()} "
        f"{os.cpu_count()} CPUs, Linux {platform.release()}",
        "command": " ".join(["pyvmm", "compare", *sys.argv[sys.argv.index("compare") + 1:]]
                            if "compare" in sys.argv else ["pyvmm", "compare"]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}}
    skip = {r.name: measure.unavailable(r, guests) for r in rows}
    todo = [r for r in rows if skip[r.name] is None]
    if todo:
        result["params"]["tsc_mhz"] = measure.tsc_hz() / 1e6
    hz = result["params"]["tsc_mhz"] * 1e6
    per_row: dict[str, list[dict[str, float | None]]] = {r.name: [] for r in todo}
    failed: dict[str, str] = {}

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyvmm-compare-")))
        img = work / "disk.img"
        if any(r.cls == "disk" for r in todo):
            with img.open("wb") as f:  # random data, read into the page cache by the runs
                for _ in range(64):
                    f.write(os.urandom(1 << 20))
        tap = (stack.enter_context(measure.echo_tap())
               if any(r.workload == "nic" for r in todo) else None)
        env = measure.Env(guests=guests, img=img, work=work, hz=hz, tap=tap,
                          timeout=300.0)
        progress = stack.enter_context(Progress(
            TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/"
            "{task.total} runs"), TimeElapsedColumn(), console=_stderr_console(),
            transient=True))
        task = progress.add_task("compare", total=2 * sizes.rounds * len(todo))
        for rnd in range(sizes.rounds):
            # Alternate the order by round so no row always runs on a cold cache.
            for row in (todo if rnd % 2 == 0 else todo[::-1]):
                if row.name in failed:
                    progress.advance(task, 2)
                    continue
                progress.update(task, description=f"round {rnd + 1}: {row.name}")
                try:
                    per_row[row.name].append(measure.measure_round(
                        row, env, sizes, lambda: progress.advance(task)))
                except measure.RowFailed as e:
                    failed[row.name] = str(e)
    for r in rows:
        entry: dict[str, Any] = {"name": r.name, "class": r.cls, "vmm": r.vmm,
                                 "mode": r.mode, "device": r.device,
                                 "transport": r.transport, "ops": sizes.of(r)[0]}
        if skip[r.name] is not None:
            entry.update(status="skipped", reason=skip[r.name], metrics={})
        elif r.name in failed:
            entry.update(status="failed", reason=failed[r.name], metrics={})
        else:
            entry.update(status="ok", reason="",
                         metrics=measure.median_metrics(per_row[r.name]))
        result["rows"].append(entry)
    return _write(result, json_path, md_path, plots)


def _write(result: dict[str, Any], json_path: Path | None, md_path: Path | None,
           plots: list[Path]) -> int:
    from pyvmm.compare import report

    report.print_table(result)
    if json_path:
        json_path.write_text(report.to_json(result))
    if md_path:
        md_path.write_text(report.markdown_page(result))
    if plots:
        report.plot(result, plots)
    return 0


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)
