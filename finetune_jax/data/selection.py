"""Which rows of a split a run uses: a held-out selection set carved from train, and caps.

Everything here depends on `split_seed` only, never on the run's `seed`, so every seed of a
sweep trains on the same rows and selects on the same held-out ones. With `strata` (one
group id per row, e.g. the class) the holdout and the caps are drawn per group in
proportion to its size, so a small class keeps its share of every derived split.
"""

from __future__ import annotations

import numpy as np

HOLDOUT = "holdout"  # the split name under which the held-out train rows are evaluated


def split_rows(
    num_rows: int,
    split: str,
    holdout_rows: int,
    max_rows: int,
    split_seed: int,
    strata: np.ndarray | None = None,
) -> np.ndarray | None:
    """Sorted row indices of the loaded file that form `split`, or None for all of them.

    `split` "holdout" is `holdout_rows` rows drawn from train; "train" is the rest of train;
    any other split is its file. Each is capped at `max_rows` (0 = no cap): the holdout's cap
    draws from the held-out rows only, so the train rows never depend on it.
    `strata` (length `num_rows`) makes both draws stratified.
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
    if strata is not None and len(strata) != num_rows:
        raise ValueError(f"{len(strata)} strata for {num_rows} rows")
    if split in ("train", HOLDOUT) and holdout_rows > 0:
        if strata is None:
            order = np.random.default_rng([split_seed, 1]).permutation(num_rows)
            rows = order[:holdout_rows] if split == HOLDOUT else order[holdout_rows:]
        else:
            held = _stratified_draw(
                np.arange(num_rows), holdout_rows, strata, np.random.default_rng([split_seed, 3])
            )
            rows = held if split == HOLDOUT else np.setdiff1d(np.arange(num_rows), held)
    elif max_rows <= 0 or max_rows >= num_rows:
        return None
    else:
        rows = np.arange(num_rows)
    if 0 < max_rows < len(rows):
        if strata is None:
            rows = np.random.default_rng([split_seed, 2]).permutation(rows)[:max_rows]
        else:
            rows = _stratified_draw(rows, max_rows, strata, np.random.default_rng([split_seed, 4]))
    return np.sort(rows)


def _stratified_draw(
    rows: np.ndarray, count: int, strata: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """`count` of `rows`, each stratum contributing in proportion to its share of `rows`
    (largest remainders round the quotas so they sum to `count`)."""
    groups, members_of = np.unique(strata[rows], return_inverse=True)
    sizes = np.bincount(members_of, minlength=len(groups))
    quotas = sizes * count / len(rows)
    take = np.floor(quotas).astype(int)
    # Ties in the remainder go to the earlier stratum: stable, so the draw is reproducible.
    extra = np.argsort(-(quotas - take), kind="stable")[: count - take.sum()]
    take[extra] += 1
    chosen = [rng.permutation(rows[members_of == group])[:n] for group, n in enumerate(take) if n]
    return np.concatenate(chosen)


def file_split(split: str) -> str:
    """The file split a (possibly derived) split is read from."""
    return "train" if split == HOLDOUT else split


def config_rows(
    config, split: str, num_rows: int, strata: np.ndarray | None = None
) -> np.ndarray | None:
    """`split_rows` with the caps, holdout size and seed of `config.data`; stratified by
    `strata` (the loader's per-row groups, e.g. class ids) when `data.stratify` is set."""
    data = config.data
    if data.stratify and strata is None:
        raise ValueError(
            f"data.stratify=True but task {data.task!r} has no labels known before the "
            "split (regression, chat and speech tasks have none): set data.stratify=False"
        )
    if data.stratify and np.ndim(strata) != 1:
        raise ValueError(
            f"data.stratify=True needs one class per row, but task {data.task!r} has labels "
            f"of shape {np.shape(strata)} (multi-label?): set data.stratify=False"
        )
    cap = data.max_train_rows if split == "train" else data.max_eval_rows
    return split_rows(
        num_rows,
        split,
        data.holdout_rows,
        cap,
        data.split_seed,
        strata=strata if data.stratify else None,
    )
