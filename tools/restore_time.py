"""Seconds to restore the latest checkpoint of workdirs of one config, in one sitting: a
slim one (its frozen params streamed from `model.name` again and checked) next to a full one
(`train.checkpoint_frozen=True`: every param read from the checkpoint).

  python tools/restore_time.py --workdirs=runs/slim,runs/full [--repeats=3]

The config is the first workdir's saved one. One built Setup serves every restore; the
workdirs take turns, `--repeats` times each. Also prints the seconds to checksum the
restored state's frozen params (what a run's start adds for its slim checkpoints' record).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.training import builder, checkpoints, run_config  # noqa: E402

WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs of runs of one config.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Restores of each workdir, taking turns.")


def main(argv) -> None:
    del argv
    quiet_libraries()
    setup = builder.build(run_config.saved_config(WORKDIRS.value[0]))
    for repeat in range(REPEATS.value):
        for workdir in WORKDIRS.value:
            manager = checkpoints.make_manager(workdir, 2, None, read_only=True)
            start = time.perf_counter()
            state, _ = setup.restore_latest(manager)
            jax.block_until_ready(state)
            restore = time.perf_counter() - start
            checkpoints.close(manager)
            start = time.perf_counter()
            setup.frozen_record(state.params)
            record = time.perf_counter() - start
            print(f"{workdir} #{repeat}: restore {restore:.2f} s, checksums {record:.2f} s")
            del state


if __name__ == "__main__":
    flags.mark_flag_as_required("workdirs")
    app.run(main)
