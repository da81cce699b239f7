"""Independent seeds derived from the run's seed, so that no draw comes from a global RNG."""

from __future__ import annotations

import numpy as np


def sub_seed(seed: int, *keys: int) -> int:
    """An independent seed per (seed, keys): e.g. per domain of a partition, or per client and round."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
