"""Fine-tune a pretrained model: `python -m finetune_jax.train --config=... --workdir=...`.

Resumes automatically from the latest checkpoint in the workdir (see training/loop.py).
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from finetune_jax.cli import OVERRIDE_HELP, quiet_libraries, run_main
from finetune_jax.cluster import distributed
from finetune_jax.training import workdir_files
from finetune_jax.training.loop import train


def main() -> None:
    # Flags are defined here, not at import, so tests can import `train` next to `eval`.
    config = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/**.py)." + OVERRIDE_HELP
    )
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
    cluster = distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        distributed.initialize_from_flags(cluster)
        summary = train(config.value, workdir.value)
        if jax.process_index() == 0:
            print(workdir_files.json_text(summary, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
