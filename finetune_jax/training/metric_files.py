"""Metrics to `<workdir>/metrics.jsonl` and TensorBoard event files; process 0 only.

A URL workdir (`gs://...`) gets the same files: metrics.jsonl through `LineFile`, and the
TensorBoard events written to a local temporary directory and copied into
`<workdir>/tensorboard` at each `sync` and at `close`. (tensorboardX writes `gs://` itself only
through google-cloud-storage, bypassing the workdir's filesystem, so it is not used for it.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax

from finetune_jax.training import workdir_files


class MetricWriter:
    """Appends one JSON object per (step, kind) and mirrors scalars to TensorBoard."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        enabled: bool | None = None,
        resume_step: int = 0,
        sync_every_s: float = 30.0,
    ):
        """`sync_every_s`: for a URL workdir, the longest time between uploads of the files
        while writing (`sync` and `close` upload at once)."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = self._tb_local = None
        if not self.enabled:
            return
        path = workdir_files.workdir_path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        self._jsonl = workdir_files.LineFile(path / "metrics.jsonl", sync_every_s)
        # On resume, forget records of steps after the checkpoint: they will be logged again.
        # Appending to the rest: a resumed run continues the same log rather than restarting it.
        self._jsonl.start(_records_up_to(self._jsonl.read(), resume_step))
        self._tb_dir = path / "tensorboard"
        if workdir_files.is_url(path):
            self._tb_local = tempfile.mkdtemp(prefix="tensorboard-")
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy import, process 0 only)

        self._tb = SummaryWriter(self._tb_local or os.fspath(self._tb_dir))

    def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        """Record `metrics` (scalars) under `kind` (e.g. 'train', 'eval')."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{name}", value, step)
        record = workdir_files.json_text({"step": step, "kind": kind, **values})
        if self._jsonl.append(record + "\n"):
            self._upload_tensorboard()  # the log was uploaded: keep TensorBoard level with it

    def sync(self) -> None:
        """Make everything written so far durable in the workdir (uploads a URL's files)."""
        if self.enabled:
            self._jsonl.sync()
            self._upload_tensorboard()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._tb_local is not None:
                workdir_files.upload_tree(self._tb_local, self._tb_dir)
                shutil.rmtree(self._tb_local, ignore_errors=True)
                self._tb_local = None

    def _upload_tensorboard(self) -> None:
        if self._tb_local is not None:
            self._tb.flush()
            workdir_files.upload_tree(self._tb_local, self._tb_dir)


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def _records_up_to(lines: list[str], step: int) -> list[str]:
    """The records of steps up to `step`, dropping lines cut short by a crash."""
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError):
            continue
    return keep
