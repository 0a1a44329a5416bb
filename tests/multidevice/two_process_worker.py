"""One of two processes (4 CPU devices each) training the tiny model as one 8-device job.

Usage: python two_process_worker.py PORT PROCESS_ID WORKDIR MODEL_DIR DATA_DIR [lora]
Trains 3 steps, stops (checkpoint), then resumes to 6 steps: save and restore are
multi-process. `lora`: LoRA (rank 4) on fsdp=8, so the checkpoints are slim and the resume
streams the frozen base again into shards across both processes. Started by
test_two_processes.py (and test_slim_checkpoints.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finetune_jax.cluster import distributed  # noqa: E402


def main(port, process_id, workdir, model_dir, data_dir, *options):
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    import jax  # noqa: PLC0415

    from finetune_jax.train import train  # noqa: PLC0415
    from tests.helpers import tiny_config  # noqa: PLC0415

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    config = tiny_config(model_dir, data_dir)
    if "lora" in options:  # frozen params sharded over both processes
        config.peft.rank, config.optim.preset = 4, "lora"
        config.mesh.data, config.mesh.fsdp = 1, 8
    train(config, workdir, until_step=3)
    train(config, workdir)


if __name__ == "__main__":
    main(*sys.argv[1:])
