"""Before/after in one run: the start-up and exit-cost benches against two source
trees, interleaved round by round, so a change is measured against what it replaced
under the same load. The trees are checkouts (``git worktree add /tmp/before REV``).

    python bench/revs.py BEFORE_TREE AFTER_TREE [--rounds R]

Prints min/median/max for each tree: ms to the guest's first serial byte
(bench/vm_start.py) and µs per PIO and MMIO exit (bench/exit_roundtrip.py, with the C
loop's time in the same round for reference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(tree: Path, script: str, extra: list[str]) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # start-up is measured from bytecode
        subprocess.run([sys.executable, str(HERE / script), "--rounds", "1", "--json",
                        out.name, *extra], env=env, check=True, capture_output=True)
        return json.loads(Path(out.name).read_text())  # type: ignore[no-any-return]


def spread(xs: list[float]) -> str:
    return f"{min(xs):7.2f} {statistics.median(xs):7.2f} {max(xs):7.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs=2, type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50000)
    a = ap.parse_args()
    for tree in a.trees:  # bytecode first: compiling would be measured as start-up
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "src")],
                       check=True, capture_output=True,
                       env={k: v for k, v in os.environ.items()
                            if k != "PYTHONDONTWRITEBYTECODE"})
    start: dict[Path, list[float]] = {t: [] for t in a.trees}
    exits: dict[tuple[Path, str, str], list[float]] = {}
    for _ in range(a.rounds):
        for tree in a.trees:
            vs = one(tree, "vm_start.py", [])
            start[tree].append(vs["pyvmm"]["first"][0] * 1e3)  # type: ignore[index]
            er = one(tree, "exit_roundtrip.py", ["--iters", str(a.iters)])
            for guest, r in er["results"].items():  # type: ignore[attr-defined]
                for who in ("c_us", "pyvmm_us"):
                    exits.setdefault((tree, guest, who), []).append(r[who])
    print(f"{a.rounds} interleaved rounds; min / median / max")
    for tree in a.trees:
        print(f"{tree}:")
        print(f"  start to first serial byte, ms   {spread(start[tree])}")
        for guest in ("pio_loop", "mmio_loop"):
            py, c = exits[(tree, guest, "pyvmm_us")], exits[(tree, guest, "c_us")]
            print(f"  {guest:9} exit, µs  pyvmm {spread(py)}   C loop {spread(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
