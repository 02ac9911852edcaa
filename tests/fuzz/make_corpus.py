"""Write the seed corpora (tests/fuzz/corpus/TARGET/seed-N) from ``targets.seeds()``.

    python -m tests.fuzz.make_corpus
"""

from __future__ import annotations

import hashlib

from tests.fuzz import targets


def main() -> None:
    for name, inputs in targets.seeds().items():
        d = targets.CORPUS / name
        d.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (d / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)


if __name__ == "__main__":
    main()
