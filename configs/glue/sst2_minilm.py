"""Fine-tune the packaged all-MiniLM-L6-v2 (6-layer BERT) on GLUE SST-2.

  python -m finetune_jax.train --config=configs/glue/sst2_minilm.py --workdir=runs/sst2 \\
      --config.data.dir=../shared/data/glue/sst2
  python -m finetune_jax.eval --config=configs/glue/sst2_minilm.py --workdir=runs/sst2

Expected (2-core CPU, 300 steps, batch 32, lr 1e-4): dev accuracy 0.857, ~0.65 s/step, 9 of
the 11 bucket shapes compiled (measured; linear_probe, before the speed work: 0.647 at lr 1e-4,
0.72 at lr 1e-3, 0.33 s/step; 0.17 s/step now).
Presets: --config.optim.preset=linear_probe | bitfit | top_k_layers | llrd;
LoRA: --config.peft.rank=8 --config.optim.preset=lora (see README, LoRA).
"""

from finetune_jax.config import base_config


def get_config():
    config = base_config()
    config.data.task = "sst2"
    config.data.dir = "../shared/data/glue/sst2"
    config.data.max_length = 64
    # Fine buckets: SST-2 batches mostly need 24-48 tokens; each bucket is one compile (once:
    # the compilation cache keeps them). Steps of 4 tokens pad a batch 4.6% past its longest
    # row on average, steps of 8 tokens 11.5% (sampled batches of SST-2 train).
    config.data.buckets = (16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 64)
    config.optim.lr = 1e-4
    config.train.batch_size = 32
    config.train.max_steps = 300
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    return config
