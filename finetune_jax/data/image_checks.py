"""Images that cannot be read, found before step 1: every file of a split is opened (header,
and PNG checksums; no pixels decoded) when the split loads, so a corrupt or missing file
stops the run at once, naming all of them, instead of when its batch comes.
`data.bad_images="skip"` leaves them out instead, and says how many.

Only sources whose images are files have something to check (folder, table, ELPV); IDX
arrays are checked whole when read, and hub datasets decode from their Arrow files.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from PIL import UnidentifiedImageError

from finetune_jax.data.image_sources import ImageSplit, take
from finetune_jax.data.text_sources import DataError

POLICIES = ("error", "skip")  # the values of data.bad_images
NAMED = 20  # files a message names; the rest are counted
_THREADS = min(8, os.cpu_count() or 1)  # opening files waits on the disk, not the GIL


def check_policy(policy: str) -> None:
    """Refuses a `data.bad_images` value that is not one of POLICIES."""
    if policy not in POLICIES:
        raise ValueError(
            f"data.bad_images={policy!r}: expected 'error' (stop, naming every unreadable "
            "image) or 'skip' (leave them out, with a count)"
        )


def unreadable(split: ImageSplit) -> list[tuple[int, str]]:
    """(row, why) for each example of `split` whose image file cannot be opened, in row order."""
    if split.check is None:
        return []

    def problem(row: int) -> str | None:
        try:
            split.check(row)
        except Exception as e:  # any failure to open makes the image unusable
            return _reason(e)
        return None

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="image-check") as pool:
        found = list(pool.map(problem, range(len(split))))
    return [(row, why) for row, why in enumerate(found) if why is not None]


def rows_to_leave_out(split: ImageSplit, name: str, policy: str) -> np.ndarray:
    """Rows of `split` (called `name` in messages) whose images cannot be read, under
    `policy` ("error": a DataError naming them, if any; "skip": them, with a warning that
    counts and names them). Empty when every image opens."""
    check_policy(policy)
    bad = unreadable(split)
    if not bad:
        return np.zeros(0, np.int64)
    listed = "; ".join(f"{split.locate(row)}: {why}" for row, why in bad[:NAMED])
    more = f"; and {len(bad) - NAMED} more" if len(bad) > NAMED else ""
    count = f"{len(bad)} of {len(split)} {name} images cannot be read"
    if policy == "error":
        raise DataError(
            f"{count}: {listed}{more}. Replace or remove them, or set "
            "data.bad_images='skip' to leave them out"
        )
    if len(bad) == len(split):
        raise DataError(f"{count} (every one): {listed}{more}")
    if jax.process_index() == 0:
        print(
            f"warning: {count} and are left out (data.bad_images='skip'): {listed}{more}",
            file=sys.stderr,
        )
    return np.asarray([row for row, _ in bad], np.int64)


def without(split: ImageSplit, rows: np.ndarray) -> ImageSplit:
    """`split` less the examples at `rows` (the same object when there are none)."""
    if len(rows) == 0:
        return split
    return take(split, np.setdiff1d(np.arange(len(split)), rows))


def _reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL recognises"
    if isinstance(e, OSError) and e.strerror:  # no file, no permission: errno's own words
        return e.strerror
    return str(e) or type(e).__name__
