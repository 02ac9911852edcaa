"""Log a guest-caused problem once per kind, then only count it.

A guest can trigger the same mistake millions of times; the host log must not grow
with it. The first occurrence of each key is logged, later ones are counted and the
count is reported with the exit table.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("pyvmm")


class OnceLog:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def warn(self, key: str, message: str) -> None:
        self.counts[key] += 1
        if self.counts[key] == 1:
            log.warning("%s (logged once; further occurrences are counted)", message)
