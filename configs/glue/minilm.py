"""The packaged all-MiniLM-L6-v2 on any GLUE task; pick it after a colon.

  python -m finetune_jax.train --config=configs/glue/minilm.py:mrpc --workdir=runs/mrpc \\
      --config.data.dir=../shared/data/glue/mrpc

Tasks: sst2, mrpc, rte, cola, stsb (and rotten_tomatoes). Pair tasks use max_length 128.
"""

from finetune_jax.config import base_config

_PAIR_TASKS = ("mrpc", "rte", "stsb")


def get_config(task: str = "sst2"):
    config = base_config()
    config.data.task = task
    data_name = "rotten_tomatoes" if task == "rotten_tomatoes" else f"glue/{task}"
    config.data.dir = f"../shared/data/{data_name}"
    config.data.max_length = 128 if task in _PAIR_TASKS else 64
    config.data.buckets = (32, 64, 128) if task in _PAIR_TASKS else (16, 32, 64)
    config.optim.lr = 1e-4
    config.train.batch_size = 32
    config.train.max_steps = 1000
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
