"""Tiny guests under pyvmm on /dev/kvm: output, exact exit accounting, exit codes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine
from tests.conftest import pyvmm_cmd, wait_for_path

GREETING = "Hello from a pyvmm tiny guest!\n"
UART_INIT_WRITES = 7  # uart_init() in guests/runtime/rt.c


def run_cli(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvmm_cmd("run", *args), capture_output=True, text=True,
                          timeout=timeout, **kw)


def device(report: dict[str, Any], name: str) -> dict[str, Any]:
    for bus in report["buses"]:
        for d in bus["devices"]:
            if d["name"] == name:
                return d  # type: ignore[no-any-return]
    raise KeyError(name)


def test_hello_prints_greeting_exits_zero_and_counts_uart_exactly(guests: Path,
                                                                  tmp_path: Path) -> None:
    js = tmp_path / "exits.json"
    p = run_cli("--kernel", str(guests / "hello.elf"), "--serial", "stdio",
                "--exits-json", str(js))
    assert p.returncode == 0, p.stderr
    assert p.stdout == GREETING
    # The exit table on stderr names the UART with its exact counts.
    row = next(line for line in p.stderr.splitlines() if line.startswith("serial0"))
    reads, writes = len(GREETING), UART_INIT_WRITES + len(GREETING)
    assert row.split()[3:6] == [str(reads), str(writes), str(reads + writes)]
    report = json.loads(js.read_text())
    s = device(report, "serial0")
    assert (s["reads"], s["writes"]) == (reads, writes)
    # offset 0: one DLL write under DLAB in uart_init, then one THR write per byte
    assert {"kind": "w", "offset": 0, "size": 1, "count": len(GREETING) + 1} in s["accesses"]
    assert {"kind": "r", "offset": 5, "size": 1, "count": len(GREETING)} in s["accesses"]
    assert report["result"]["reason"] == "reset"
    assert report["exits"]["io"] == reads + writes + 1  # + the i8042 reset write


@pytest.mark.parametrize("image,extra", [("hello.elf", []), ("hello.mb", []),
                                         ("hello.bin", ["--load-addr", "0x100000"])])
def test_every_boot_format_reaches_main(guests: Path, image: str, extra: list[str]) -> None:
    p = run_cli("-q", "--kernel", str(guests / image), *extra)
    assert (p.returncode, p.stdout) == (0, GREETING), p.stderr


@pytest.mark.parametrize("code", [1, 5, 0x3F])
def test_debug_exit_code_propagates(guests: Path, code: int) -> None:
    p = run_cli("-q", "--kernel", str(guests / "exit_code.elf"), "--cmdline", f"code={code}")
    assert p.returncode == (code << 1) | 1


def test_debug_exit_port_and_size_are_configurable(guests: Path) -> None:
    # The guest writes 0x105 as a 32-bit value to port 0xf4; a 1-byte port at 0xf4
    # sees 0x05. Moved to 0x501, the write lands on nothing and the guest falls
    # through to spinning, so the timeout ends it.
    p = run_cli("-q", "--kernel", str(guests / "exit_code.elf"), "--cmdline", "code=0x105",
                "--debug-exit-size", "1")
    assert p.returncode == (0x05 << 1) | 1
    p = run_cli("-q", "--kernel", str(guests / "exit_code.elf"), "--cmdline", "code=3",
                "--debug-exit-port", "0x501", "--timeout", "1")
    assert p.returncode == 124


def test_i8042_reset_ends_the_vm_cleanly(guests: Path) -> None:
    cfg = MachineConfig.from_dict({"kernel": str(guests / "exit_code.elf"),
                                   "cmdline": "code=0", "quiet": True, "serial": "none"})
    with Machine(cfg) as m:
        r = m.run()
        assert (r.reason, r.exit_code) == ("reset", 0)
        assert m.i8042.resets == 1


@pytest.mark.parametrize("iters", [1, 1000, 20000])
def test_pio_loop_exit_count_is_exact(guests: Path, iters: int) -> None:
    cfg = MachineConfig.from_dict({"kernel": str(guests / "pio_loop.elf"), "quiet": True,
                                   "cmdline": f"iters={iters}", "serial": "none"})
    with Machine(cfg) as m:
        assert m.run().exit_code == 0
        printed = m.serial.tx_bytes  # bytes sent through THR: the result line
        scr = m.pio.find(0x3FF)
        assert scr is not None
        assert scr.count("w", 7, 1) == iters
        assert scr.writes == UART_INIT_WRITES + iters + printed
        assert scr.reads == printed  # one LSR poll per printed byte
        assert m.exit_counts[2] == scr.reads + scr.writes + 1


@pytest.mark.parametrize("iters", [1, 1000, 20000])
def test_mmio_loop_exit_count_is_exact(guests: Path, iters: int) -> None:
    cfg = MachineConfig.from_dict({"kernel": str(guests / "mmio_loop.elf"), "quiet": True,
                                   "cmdline": f"iters={iters}", "serial": "none"})
    with Machine(cfg) as m:
        assert m.run().exit_code == 0
        assert m.testdev.writes == iters
        assert m.testdev.data == iters - 1
        assert m.exit_counts[6] == iters
        rng = m.mmio.find(0xFEF00000)
        assert rng is not None and rng.count("w", 0, 4) == iters


def test_unclaimed_accesses_are_counted_and_the_vm_goes_on(guests: Path) -> None:
    p = run_cli("--kernel", str(guests / "bad_access.elf"), "--cmdline", "code=0x21")
    assert p.returncode == (0x21 << 1) | 1, p.stderr
    assert "bad-access pio=ff mmio=ffffffff" in p.stdout
    rows = [line.split() for line in p.stderr.splitlines() if line.startswith("(unclaimed)")]
    assert ["(unclaimed)", "pio", "0x2f0", "1", "1", "2"] in rows
    assert ["(unclaimed)", "mmio", "0xd0000000", "1", "1", "2"] in rows


def test_guest_exception_is_reported_not_fatal_to_the_vmm(guests: Path) -> None:
    p = run_cli("--kernel", str(guests / "fault.elf"))
    assert p.returncode == ((0x40 | 6) << 1) | 1
    exc = next(line for line in p.stdout.splitlines() if line.startswith("!"))
    assert exc.split()[1] == "06"  # #UD


def test_timeout_kicks_a_spinning_vcpu(guests: Path) -> None:
    t0 = time.monotonic()
    p = run_cli("--kernel", str(guests / "spin.elf"), "--timeout", "0.5")
    assert p.returncode == 124
    assert "spinning" in p.stdout
    assert time.monotonic() - t0 < 30
    assert "no result within 0.5 s" in p.stderr


def test_serial_input_from_stdin_with_backpressure(guests: Path) -> None:
    """100 bytes (more than the 16-byte FIFO) typed after the guest is ready all
    arrive in order."""
    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--kernel", str(guests / "echo.elf")),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        buf = b""
        deadline = time.monotonic() + 30
        while b"echo ready\n" not in buf and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1)
            if r:
                buf += os.read(proc.stdout.fileno(), 4096)
        assert b"echo ready\n" in buf
        text = (b"abcdefghij" * 10)[:99] + b"\n"
        proc.stdin.write(text)
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (buf + out).split(b"echo ready\n", 1)[1] == text.upper()
    assert proc.returncode == ((100 & 0x3F) << 1) | 1


def test_serial_to_file(guests: Path, tmp_path: Path) -> None:
    out = tmp_path / "console.log"
    p = run_cli("-q", "--kernel", str(guests / "hello.elf"), "--serial", f"file:{out}")
    assert p.returncode == 0 and p.stdout == ""
    assert out.read_text() == GREETING


def test_serial_to_unix_socket(guests: Path, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "console.sock"
    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--kernel", str(guests / "echo.elf"),
                                      "--serial", f"socket:{path}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for_path(path)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.settimeout(30)
        # Output from before we connected is kept for us (bounded backlog).
        got = b""
        while b"echo ready\n" not in got:
            chunk = s.recv(100)
            assert chunk
            got += chunk
        s.sendall(b"sock\n")
        while not got.endswith(b"SOCK\n"):
            chunk = s.recv(100)
            assert chunk
            got += chunk
        s.close()
        assert proc.wait(timeout=30) == ((5 << 1) | 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not path.exists()  # the socket is removed when the VM ends
