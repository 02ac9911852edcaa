"""The fuzz tier in CI: the committed seeds and a deterministic sweep replayed through
every target (no atheris needed), and each target fuzzed briefly under atheris with a
fixed seed and run count — deterministic, so what passes here passes in CI. The long
runs and what they found are in docs/fuzzing.md (scripts/fuzz.sh)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.fuzz import targets

SMOKE_RUNS = 3000


@pytest.fixture(autouse=True)
def quiet() -> None:
    logging.disable(logging.CRITICAL)  # the devices' log-once warnings are the point here
    yield  # type: ignore[misc]
    logging.disable(logging.NOTSET)


def test_there_is_a_target_on_every_surface() -> None:
    assert len(targets.TARGETS) >= 12
    for surface in ("virtqueue", "virtio_blk", "virtio_net", "virtio_pci_regs",
                    "virtio_mmio_regs", "pci", "nvme", "uart", "pic", "pit", "rtc", "ioapic",
                    "i8042", "vhost_user_codec", "vhost_user_session", "vfio_user_session",
                    "vhost_user_frontend", "ide", "e1000", "vga",
                    "config_json", "image_loader"):
        assert surface in targets.TARGETS


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seeds_and_a_random_sweep_pass(name: str) -> None:
    fn = targets.TARGETS[name]
    corpus = targets.CORPUS / name
    inputs = [p.read_bytes() for p in sorted(corpus.glob("*"))] if corpus.is_dir() else []
    rnd = random.Random(name)  # the same sweep every time
    inputs += [rnd.randbytes(rnd.choice((0, 7, 64, 700, 5000))) for _ in range(60)]
    targets.fresh_ram()  # made once, on first use: not counted as growth
    targets._image()
    fds = len(os.listdir("/proc/self/fd"))
    for data in inputs:
        fn(data)
    assert len(os.listdir("/proc/self/fd")) == fds  # nothing left open by any input


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_atheris_smoke(name: str, tmp_path: object) -> None:
    pytest.importorskip("atheris", reason="atheris is in the dev extras")
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, "--runs",
                        str(SMOKE_RUNS), "--seed", "1", "--timeout", "120", "--out",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode == 0, tail
    assert f"Done {SMOKE_RUNS} runs" in p.stderr, tail
