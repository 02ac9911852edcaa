"""Bad host input: each is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.kvm import system
from tests.conftest import pyvmm_cmd


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, text: str) -> None:
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pyvmm: error:") and text in lines[0], lines[0]


def test_no_dev_kvm(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                    guests: Path) -> None:
    monkeypatch.setattr(system, "DEV_KVM", "/nonexistent/kvm")
    rc, err = run_main(capsys, "run", "--kernel", str(guests / "hello.elf"))
    assert_one_line_error(rc, err, "/nonexistent/kvm does not exist")


def test_no_permission_on_dev_kvm(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, guests: Path) -> None:
    def deny(*a: object, **k: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(system.os, "open", deny)
    rc, err = run_main(capsys, "run", "--kernel", str(guests / "hello.elf"))
    assert_one_line_error(rc, err, "no permission to open /dev/kvm")


def test_missing_kernel(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, err = run_main(capsys, "run", "--kernel", str(tmp_path / "missing.elf"))
    assert_one_line_error(rc, err, "kernel file not found")


def test_invalid_kernel(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    k = tmp_path / "garbage"
    k.write_bytes(b"\x00garbage" * 100)
    before = k.read_bytes()
    rc, err = run_main(capsys, "run", "-q", "--kernel", str(k))
    assert_one_line_error(rc, err, "not an ELF or multiboot image")
    assert k.read_bytes() == before  # nothing on disk touched


@pytest.mark.parametrize("mem,text", [("99999G", "more than the host has"),
                                      ("lots", "is not a size"), ("1M", "too small"),
                                      ("3M", "multiple of 2 MiB")])
def test_bad_memory(capsys: pytest.CaptureFixture[str], guests: Path, mem: str,
                    text: str) -> None:
    rc, err = run_main(capsys, "run", "--kernel", str(guests / "hello.elf"), "--memory", mem)
    assert_one_line_error(rc, err, text)


def test_unknown_option_is_one_line() -> None:
    p = subprocess.run(pyvmm_cmd("run", "--frobnicate"), capture_output=True, text=True)
    assert_one_line_error(p.returncode, p.stderr, "unrecognized arguments: --frobnicate")


@pytest.mark.parametrize("serial,text", [("tcp:1234", "use stdio, file:PATH"),
                                         ("file:", "needs a path"), ("stdio:x", "takes no path")])
def test_bad_serial(capsys: pytest.CaptureFixture[str], guests: Path, serial: str,
                    text: str) -> None:
    rc, err = run_main(capsys, "run", "--kernel", str(guests / "hello.elf"), "--serial", serial)
    assert_one_line_error(rc, err, text)


@pytest.mark.parametrize("content,text", [("{", "invalid JSON"), ("[]", "must be an object"),
                                          ('{"kernel": "x", "colour": 1}', "unknown key 'colour'"),
                                          ('{"kernel": "x", "memroy": "1G"}',
                                           "did you mean 'memory'"),
                                          ('{"kernel": "x", "quiet": "false"}', "not a boolean"),
                                          ('{"kernel": "x", "memory": true}', "not a size"),
                                          ('{"memory": "64M"}', "no kernel")])
def test_bad_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str,
                         text: str) -> None:
    c = tmp_path / "vm.json"
    c.write_text(content)
    rc, err = run_main(capsys, "run", "--config", str(c))
    assert_one_line_error(rc, err, text)


def test_config_file_fields_match_options(tmp_path: Path, guests: Path) -> None:
    from pyvmm.machine.config import MachineConfig

    c = tmp_path / "vm.json"
    c.write_text(json.dumps({"kernel": str(guests / "hello.elf"), "memory": "32M",
                             "serial": "file:/tmp/x", "cmdline": "a=1", "debug_exit_port": 0x501,
                             "timeout": 5, "devices": [
                                 {"type": "virtio-rng", "transport": "mmio", "rate": 64}]}))
    cfg = MachineConfig.from_json(str(c), {"cmdline": "b=2"})
    assert cfg.memory == 32 << 20 and cfg.serial == "file:/tmp/x" and cfg.cmdline == "b=2"
    assert cfg.debug_exit_port == 0x501 and cfg.timeout == 5.0
    (rng,) = cfg.of_type("virtio-rng")
    assert rng.transport == "mmio" and rng.rate == 64  # type: ignore[attr-defined]


def test_info_machine_lists_the_map() -> None:
    p = subprocess.run(pyvmm_cmd("info", "--machine"), capture_output=True, text=True,
                       check=True)
    assert "serial0" in p.stdout and "0x3f8" in p.stdout and "testdev" in p.stdout


@pytest.mark.parametrize("args,text", [(["--msi", "polling"], "not one of irqfd, signal"),
                                       (["--rng", "rate=-5"], "positive number"),
                                       (["--rng", "rate=lots"], "is not a whole number"),
                                       (["--rng", "rat=5"], "did you mean 'rate'"),
                                       (["--disk", "path=x,readonly=maybe"], "use on or off"),
                                       (["--disk", "path=x,if=scsi"], "if must be one of"),
                                       (["--device", "virtio-rgn"], "did you mean 'virtio-rng'"),
                                       (["--timeout", "nan"], "finite"),
                                       (["--timeout", "1e300"], "timeout must be between")])
def test_bad_msi_and_rng_rate(capsys: pytest.CaptureFixture[str], guests: Path,
                              args: list[str], text: str) -> None:
    rc, err = run_main(capsys, "run", "--kernel", str(guests / "hello.elf"), *args)
    assert_one_line_error(rc, err, text)


def test_info_devices_lists_the_registry() -> None:
    from pyvmm.registry import DEVICES

    p = subprocess.run(pyvmm_cmd("info", "--devices"), capture_output=True, text=True,
                       check=True)
    for spec in DEVICES:
        assert spec.name in p.stdout and spec.summary[:20] in p.stdout
    assert "--disk if=nvme" in p.stdout


def test_version_matches_the_package_metadata() -> None:
    """--version prints the version pyproject.toml declares (one source: the test
    reads the installed distribution's metadata, the CLI the package's attribute)."""
    import importlib.metadata

    p = subprocess.run(pyvmm_cmd("--version"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert p.stdout.strip() == f"pyvmm {importlib.metadata.version('pyvmm')}"


def test_pyvmm_s_own_exit_codes_are_even() -> None:
    """A guest's debug-exit codes are odd ((v << 1) | 1): pyvmm's own must not be."""
    from pyvmm import errors

    own = {k: v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert own and all(v % 2 == 0 for k, v in own.items() if k != "EXIT_TERMINATED"), own
