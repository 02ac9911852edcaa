"""Bad host input, swept: every case is one line on stderr naming the problem, the
documented exit code (2: bad option, config or image), and the files around it exactly
as they were — nothing the user did not ask to write is created, truncated or removed."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

EXIT_CONFIG = 2


def tree(d: Path) -> dict[str, tuple[int, str]]:
    """Every entry below d: its mode, and a digest of its contents (files)."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(d))] = (st.st_mode, digest)
    return out


@pytest.fixture
def box(tmp_path: Path, guests: Path) -> Iterator[Path]:
    """A working folder with a kernel, an image, a precious file, a live socket."""
    (tmp_path / "hello.elf").write_bytes((guests / "hello.elf").read_bytes())
    (tmp_path / "disk.img").write_bytes(bytes(1 << 16))
    (tmp_path / "precious.txt").write_text("do not touch\n")
    (tmp_path / "sub").mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    (tmp_path / "deep.json").write_text('{"kernel": ' + "[" * 50000 + "]" * 50000 + "}")
    (tmp_path / "bigint.json").write_text('{"kernel": "hello.elf", "memory": ' + "9" * 5000
                                          + "}")
    (tmp_path / "surrogate.json").write_text('{"kernel": "hello.elf", "cmdline": "\\ud800"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "types.json").write_text(json.dumps({"kernel": "hello.elf", "quiet": "false"}))
    (tmp_path / "elf-bad.elf").write_bytes(b"\x7fELF\x02\x01\x01" + b"\xff" * 100)
    (tmp_path / "elf-trunc.elf").write_bytes((guests / "hello.elf").read_bytes()[:80])
    yield tmp_path
    live.close()


K = ["--kernel", "hello.elf"]
CASES: list[tuple[list[str], str]] = [
    # the kernel
    (["--kernel", "missing.elf"], "kernel file not found"),
    (["--kernel", "sub"], "is a directory"),
    (["--kernel", "precious.txt"], "not an ELF or multiboot image"),
    (["--kernel", "elf-bad.elf"], "ELF for machine 65535, not x86"),
    (["--kernel", "elf-trunc.elf"], "malformed ELF"),
    (["--kernel", "x" * 300], "File name too long"),
    (["--kernel", "hello.elf", "--load-addr", "0x7fffffffffff"], "does not fit in guest memory"),
    (["--kernel", "hello.elf", "--load-addr", "-1"], "not an address"),
    (["--kernel", "hello.elf", "--load-addr", "zz"], "not a whole number"),
    # memory
    ([*K, "--memory", "lots"], "not a size"),
    ([*K, "--memory", "1M"], "too small"),
    ([*K, "--memory", "3M"], "multiple of 2 MiB"),
    ([*K, "--memory", "999999G"], "more than the host has"),
    ([*K, "--memory", "99999999999T"], "not a usable size"),
    ([*K, "--memory", "9" * 5000], "memory"),
    ([*K, "--memory=-64M"], "not a size"),
    # timeouts and numbers
    ([*K, "--timeout", "nan"], "not a finite number"),
    ([*K, "--timeout", "inf"], "not a finite number"),
    ([*K, "--timeout", "1e300"], "timeout must be between"),
    ([*K, "--timeout", "0"], "timeout must be between"),
    ([*K, "--timeout", "soon"], "not a number"),
    ([*K, "--debug-exit-port", "0x10000"], "not a port"),
    ([*K, "--debug-exit-size", "3"], "must be 1, 2 or 4"),
    ([*K, "--irqchip", "xen"], "not one of kernel, split"),
    ([*K, "--msi", "polling"], "not one of irqfd, signal"),
    ([*K, "--cmdline", "x" * 5000], "longer than 4095 bytes"),
    # the serial end: a file is not truncated by a run that never started
    ([*K, "--serial", "tcp:1"], "use stdio, file:PATH"),
    ([*K, "--serial", "file:"], "needs a path"),
    ([*K, "--serial", "file:sub"], "is a directory"),
    ([*K, "--serial", "file:nofolder/out.txt"], "does not exist"),
    ([*K, "--serial", "file:precious.txt", "--memory", "1M"], "too small"),
    ([*K, "--serial", "socket:precious.txt"], "not a socket is there; not replacing it"),
    ([*K, "--serial", "socket:live.sock"], "another process is listening"),
    ([*K, "--serial", "socket:" + "s" * 120], "limit of a Unix socket path"),
    ([*K, "--serial", "stdio:x"], "takes no path"),
    ([*K, "--keyboard", "tty"], "use none or stdin"),
    # the control API's socket: nothing that is there is replaced
    ([*K, "--api-socket", "precious.txt"], "not a socket is there; not replacing it"),
    ([*K, "--api-socket", "live.sock"], "another process is listening"),
    ([*K, "--api-socket", "nofolder/api.sock"], "does not exist"),
    ([*K, "--api-socket", "s" * 120], "limit of a Unix socket path"),
    ([*K, "--api-socket", "precious.txt", "--memory", "1M"], "too small"),
    ([*K, "--web", "127.0.0.1:8080"], "web needs api_socket"),
    ([*K, "--api-socket", "api.sock", "--web", "0.0.0.0:8080"], "only a loopback address"),
    ([*K, "--api-socket", "api.sock", "--web", "127.0.0.1:http"], "use HOST:PORT"),
    # claimed, then the build fails: the socket goes again (the tree is as it was)
    (["--kernel", "elf-bad.elf", "--api-socket", "api.sock"], "ELF for machine 65535"),
    # exits json
    ([*K, "--exits-json", "nofolder/x.json"], "does not exist"),
    ([*K, "--exits-json", "precious.txt", "--memory", "1M"], "too small"),
    # devices
    ([*K, "--disk", "path=missing.img"], "disk image not found"),
    ([*K, "--disk", "path=sub"], "is a directory"),
    ([*K, "--disk", "path=precious.txt,readonly=maybe"], "not a boolean"),
    ([*K, "--disk", "path=disk.img,if=scsi"], "if must be one of"),
    ([*K, "--disk", "path=disk.img,transport=usb"], "not one of pci, mmio"),
    ([*K, "--disk", "path=disk.img,if=nvme,transport=mmio"], "unknown key 'transport'"),
    ([*K, "--disk", "pth=disk.img"], "did you mean 'path'"),
    ([*K, "--disk", "path=disk.img", "--disk", "path=disk.img"], "in use by another user"),
    ([*K, "--disk", "path=disk.img,path=disk.img"], "given more than once"),
    ([*K, "--net", "mac=01:00:00:00:00:00"], "multicast"),
    ([*K, "--net", "mac=zz"], "must look like"),
    ([*K, "--rng", "rate=0"], "positive number"),
    ([*K, "--rng", "rate=lots"], "not a whole number"),
    ([*K, "--rng", "mmio,mmio"], "expected key=value"),
    ([*K, "--console", "socket:precious.txt"], "not a socket is there; not replacing"),
    ([*K, "--console", "file:"], "needs a path"),
    ([*K, "--device", "virtio-gpu"], "unknown device type"),
    ([*K, "--device", "virtio-rgn"], "did you mean 'virtio-rng'"),
    ([*K, "--fw-cfg", "file=opt/x=@missing"], "cannot read"),
    ([*K, "--fw-cfg", "file=etc/x=1"], "under opt/"),
    ([*K] + ["--rng", "transport=mmio"] * 5, "no free virtio-mmio slot"),
    # config files
    (["--config", "missing.json"], "config file not found"),
    (["--config", "bad.json"], "invalid JSON"),
    (["--config", "list.json"], "must be an object"),
    (["--config", "deep.json"], "cannot be read as JSON"),
    (["--config", "bigint.json"], "cannot be read as JSON"),
    (["--config", "surrogate.json"], "not valid Unicode text"),
    (["--config", "types.json"], "not a boolean"),
    (["--config", "sub"], "cannot read config file"),
    (["--config", "precious.txt"], "invalid JSON"),
    # the command line itself
    (["--frobnicate"], "unrecognized arguments"),
    ([], "no kernel given"),
]


@pytest.mark.parametrize("argv,text", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_bad_input_is_one_line_and_touches_nothing(box: Path, argv: list[str],
                                                   text: str) -> None:
    before = tree(box)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", *argv], cwd=box,
                       capture_output=True, text=True, timeout=60, env=env)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == EXIT_CONFIG, p.stderr
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error:"), p.stderr
    assert text in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert tree(box) == before


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 60
