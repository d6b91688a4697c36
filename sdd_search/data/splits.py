"""Which images play which role: the three roles of a dataset, and stratified splits.

- ``train``: what a student learns from;
- ``selection``: held out from the training data to choose between trials (the search's metric);
- ``test``: the dataset's own test split, read only by the final stage, so the number reported
  for the chosen student was never used to choose it.

A search stage trains on train and evaluates on selection; the final stage trains on train +
selection (all the training data) and evaluates on test.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

__all__ = ["SELECTION_SEED", "STAGES", "Stage", "stratified_split"]

Stage = Literal["search", "final"]
STAGES: tuple[str, ...] = get_args(Stage)

# The selection split never depends on the run seed: every trial of every run sees the same one.
SELECTION_SEED = 0


def stratified_split(
    labels: np.ndarray, held_out_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held out) indices into ``labels``, a random stratified split.

    ``held_out_fraction`` (0..1) of the images are held out: ``round(fraction * N)`` in all, each
    class giving ``floor`` or ``ceil`` of ``fraction * its size`` (within one image of its exact
    share; the classes whose shares have the largest fractional parts round up, ties in a random
    order). Which images of a class are held out, and the tie order, are drawn from ``seed``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    shuffled = [
        rng.permutation(order[start : start + size])
        for start, size in zip(starts, sizes, strict=True)
    ]
    exact = held_out_fraction * sizes
    counts = np.floor(exact + 1e-9).astype(np.int64)
    missing = int(round(held_out_fraction * len(labels))) - int(counts.sum())
    tie_order = rng.random(len(sizes))
    counts[np.lexsort((tie_order, -(exact - counts)))[:missing]] += 1
    held_out = [members[:count] for members, count in zip(shuffled, counts, strict=True)]
    held_out_idx = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
    kept = np.ones(len(labels), dtype=bool)
    kept[held_out_idx] = False
    return np.flatnonzero(kept), held_out_idx
