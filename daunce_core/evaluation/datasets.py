"""The embedded default data: scikit-learn's handwritten digits, split into train and queries.

scikit-learn ships the data (1,797 8×8 images, 10 classes) inside its wheel, so nothing is
downloaded. Pixels are scaled to [0, 1]; the split is a fixed, seeded permutation.
"""

from __future__ import annotations

import numpy as np
import torch

from daunce_core.data import ExampleSet
from daunce_core.errors import DaunceError


def digits(num_queries: int = 200, seed: int = 0) -> tuple[ExampleSet, ExampleSet]:
    """Digits as ``(train, queries)`` example sets with columns ``x`` ``[N, 64]`` and ``y``.

    Args:
        num_queries: examples held out as queries (the rest train); default 200.
        seed: seed of the split.
    """
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    if not 0 < num_queries < len(labels):
        raise DaunceError(f"num_queries must be in (0, {len(labels)}); got {num_queries}.")
    order = np.random.default_rng(seed).permutation(len(labels))
    x = torch.tensor(features[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[order], dtype=torch.long)
    split = len(labels) - num_queries
    return {"x": x[:split], "y": y[:split]}, {"x": x[split:], "y": y[split:]}
