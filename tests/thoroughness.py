"""How many examples a property test draws: all of them in the full run, a tenth in the fast set.

The fast set (`pytest -m "not e2e"`) is what a developer runs between two edits, and must stay
well under a minute; the full run (`pytest tests`, what CI runs) draws every example. conftest
decides which before any test module is imported, so the counts in `@settings(...)` are final at
collection.
"""

from __future__ import annotations

FAST_SHARE = 10
FAST_FLOOR = 25

fast = False


def examples(full: int) -> int:
    """``full`` in the full run; a tenth of it, and never fewer than 25, in the fast set."""
    return max(full // FAST_SHARE, FAST_FLOOR) if fast else full
