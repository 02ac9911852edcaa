"""``pyvmm compare``: each device class in each mode pyvmm has, the same tiny-guest
workload, measured in one run (docs/comparison.md).

The package is a driver of ``pyvmm run`` / ``pyvmm backend`` subprocesses: it imports
nothing of the VMM, so what it measures is the command a user runs. ``rows`` says what
each row runs, ``measure`` runs it, ``report`` formats a result (terminal, Markdown,
JSON, plot). A result is plain JSON-able data, so the formatting is tested from a
recorded one.
"""

from __future__ import annotations

from pyvmm.compare.rows import CLASSES, ROWS, Row

__all__ = ["CLASSES", "ROWS", "Row"]
