"""Which rows of a split a run uses: a held-out selection set carved from train, and caps.

Everything here depends on `split_seed` only, never on the run's `seed`, so every seed of a
sweep trains on the same rows and selects on the same held-out ones.
"""

from __future__ import annotations

import numpy as np

HOLDOUT = "holdout"  # the split name under which the held-out train rows are evaluated


def split_rows(
    num_rows: int, split: str, holdout_rows: int, max_rows: int, split_seed: int
) -> np.ndarray | None:
    """Sorted row indices of the loaded file that form `split`, or None for all of them.

    `split` "holdout" is `holdout_rows` rows drawn from train; "train" is the rest of train,
    capped at `max_rows` (0 = no cap); any other split is its file, capped at `max_rows`.
    """
    if split == HOLDOUT and holdout_rows <= 0:
        raise ValueError(
            "split 'holdout' needs data.holdout_rows > 0 (rows held out of train as the "
            "selection set)"
        )
    if holdout_rows and split in ("train", HOLDOUT) and holdout_rows >= num_rows:
        raise ValueError(
            f"data.holdout_rows={holdout_rows} leaves no training rows: train has {num_rows}"
        )
    if split in ("train", HOLDOUT) and holdout_rows > 0:
        order = np.random.default_rng([split_seed, 1]).permutation(num_rows)
        rows = order[:holdout_rows] if split == HOLDOUT else order[holdout_rows:]
    elif max_rows <= 0 or max_rows >= num_rows:
        return None
    else:
        rows = np.arange(num_rows)
    if split != HOLDOUT and 0 < max_rows < len(rows):
        rows = np.random.default_rng([split_seed, 2]).permutation(rows)[:max_rows]
    return np.sort(rows)


def file_split(split: str) -> str:
    """The file split a (possibly derived) split is read from."""
    return "train" if split == HOLDOUT else split


def config_rows(config, split: str, num_rows: int) -> np.ndarray | None:
    """`split_rows` with the caps, holdout size and seed of `config.data`."""
    data = config.data
    cap = data.max_train_rows if split == "train" else data.max_eval_rows
    return split_rows(num_rows, split, data.holdout_rows, cap, data.split_seed)
