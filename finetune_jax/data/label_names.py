"""Class names of a classifier run: given by the config, saved by an earlier run in the
workdir, or discovered from the train split, in that order of authority."""

from __future__ import annotations

from collections.abc import Callable


def choose_label_names(
    given: tuple[str, ...] | None,
    saved: tuple[str, ...] | None,
    discover: Callable[[], tuple[str, ...]],
) -> tuple[str, ...]:
    """A classifier's class names: `given` (data.label_names or the task's own), which must
    equal `saved` (the names a run in this workdir trained with, its label_names.json) when
    both exist; else `saved`, so a resumed or evaluated run keeps its ids; else `discover()`
    (read from the train split)."""
    if given is not None:
        if saved is not None and tuple(saved) != tuple(given):
            raise ValueError(
                f"data.label_names={tuple(given)} but this run was trained with class names "
                f"{tuple(saved)} (its label_names.json): its ids mean those; leave "
                "data.label_names empty, or train in a new workdir"
            )
        return tuple(given)
    return tuple(saved) if saved is not None else tuple(discover())
