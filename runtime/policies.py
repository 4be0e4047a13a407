"""How many of a block's masked positions one step commits, under the parallel-decoding rules of Fast-dLLM.

Both rules look at the masked positions' confidences sorted in descending order, ``c_1 >= c_2 >= ...``, and
commit a prefix of that order (the most confident positions); both always commit at least one, so every step
makes progress.

- ``threshold`` tau: every position with ``c_i >= tau``.
- ``factor`` f: the largest ``n`` with ``(n + 1) * (1 - c_n) < f``. As ``(n + 1) * (1 - c_n)`` grows with ``n``,
  that is the count of positions satisfying it.
"""

from __future__ import annotations

import numpy as np


def threshold_count(sorted_confidence: np.ndarray, tau: float) -> int:
    """Commit count for descending confidences of the still-masked positions (empty: nothing to commit)."""
    if sorted_confidence.size == 0:
        return 0
    return max(1, int(np.count_nonzero(sorted_confidence >= tau)))


def factor_count(sorted_confidence: np.ndarray, f: float) -> int:
    if sorted_confidence.size == 0:
        return 0
    n = np.arange(1, sorted_confidence.size + 1)
    return max(1, int(np.count_nonzero((n + 1) * (1.0 - sorted_confidence.astype(np.float64)) < f)))
