"""Run one fuzz target under atheris (coverage-guided, libFuzzer underneath).

    python -m tests.fuzz.run TARGET [--seconds S | --runs N] [--seed K] [--out DIR]

The corpus is tests/fuzz/corpus/TARGET (committed seeds; what the fuzzer learns goes to
--out, default a temporary folder, so a run changes nothing in the tree). Limits that
make a finding: an exception out of the target (``targets.Finding`` or anything the
surface let escape), one input taking more than --timeout seconds, RSS over
--rss-mb. The last line says ``fuzz TARGET: N runs, ok`` or names the finding; the
exit status is libFuzzer's (0 clean).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("--seconds", type=int, default=0)
    ap.add_argument("--runs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1)
    ap.add_argument("--rss-mb", type=int, default=2048)
    ap.add_argument("--out", type=Path, help="where new corpus entries and crashes go")
    a = ap.parse_args()
    logging.disable(logging.CRITICAL)  # the devices' log-once warnings are expected here

    import atheris

    # Coverage for pyvmm's own code only: instrumenting every loaded module (the
    # standard library too) costs ~15 s before the first run and guides nothing.
    with atheris.instrument_imports(include=["pyvmm"]):
        from tests.fuzz import targets

    if a.target not in targets.TARGETS:
        print(f"fuzz: no target {a.target!r} (one of {', '.join(targets.TARGETS)})",
              file=sys.stderr)
        return 2
    fn = targets.TARGETS[a.target]
    out = a.out or Path(tempfile.mkdtemp(prefix=f"pyvmm-fuzz-{a.target}-"))
    work = out / "corpus"
    work.mkdir(parents=True, exist_ok=True)
    seeds = targets.CORPUS / a.target
    args = [sys.argv[0], str(work), *([str(seeds)] if seeds.is_dir() else []),
            f"-seed={a.seed}", f"-timeout={a.timeout}", f"-rss_limit_mb={a.rss_mb}",
            f"-artifact_prefix={out}/", "-print_final_stats=1"]
    if a.seconds:
        args.append(f"-max_total_time={a.seconds}")
    if a.runs:
        args.append(f"-runs={a.runs}")
    atheris.Setup(args, fn)
    with contextlib.suppress(SystemExit):
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
