"""LoRA SFT of SmolLM2-135M-Instruct on GSM8K (question -> worked answer ending "#### N").

  python -m finetune_jax.train --config=configs/sft/smollm2_gsm8k_lora.py --workdir=runs/gsm8k_lora
  python -m finetune_jax.eval --config=configs/sft/smollm2_gsm8k_lora.py --workdir=runs/gsm8k_lora --split=test
  python -m finetune_jax.export --config=configs/sft/smollm2_gsm8k_lora.py --workdir=runs/gsm8k_lora --out=runs/gsm8k_lora/hf

Checkpoints are selected on a GSM8K train holdout; summary.json "final" (and eval's
--split=test) is the selected one on 32 GSM8K test problems. Expected on a 2-core CPU
(30 steps, ~8 min): test loss 1.396 untuned (--checkpoint=pretrained) -> 0.886.

Sized for a CPU check (the bounded budget of the acceptance run); on a GPU raise
train.max_steps, data.max_eval_rows (0 = the whole 1,319-problem test set) and
generate.num_samples. Full fine-tuning at the same budget:
  --config.optim.preset=full --config.peft.rank=0 --config.optim.lr=5e-5
"""

from finetune_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "smollm2-135m-instruct"  # the packaged Q4_1 GGUF, dequantised to float32
    c.data.task = "gsm8k"
    c.data.dir = "../shared/data/gsm8k"  # train.jsonl / test.jsonl
    # Checkpoints are selected on 32 problems held out of GSM8K train; the selected one is
    # then evaluated on a fixed random 32-problem subset of GSM8K test (data.split_seed).
    c.data.eval_split = "holdout"
    c.data.holdout_rows = 32
    c.data.max_eval_rows = 32
    c.train.final_split = "test"
    c.data.max_length = 384  # packed row length; GSM8K conversations are ~150-300 tokens
    c.data.packing = True
    # Layers under scan, recomputed in the backward pass: XLA's scratch for the train step
    # drops from 4.96 to 0.68 GiB (tools/preflight.py), as the 30 unrolled layers' attention
    # probabilities are no longer all kept for the backward. (On XLA:CPU remat without scan
    # saves little: 4.62 GiB.)
    c.model.scan_layers = True
    c.model.remat = "full"

    # LoRA on every projection of attention and MLP (the QLoRA recipe), base frozen.
    c.peft.rank = 8
    c.peft.alpha = 16.0
    c.peft.targets = r".*/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
    c.optim.preset = "lora"
    c.optim.lr = 1e-3
    c.optim.warmup_fraction = 0.1
    c.optim.schedule = "cosine"

    c.train.batch_size = 4  # packed rows: ~1,500 tokens, ~7 conversations per step
    c.train.max_steps = 30
    c.train.log_every = 5
    c.train.eval_every = 15
    c.train.checkpoint_every = 15
    c.train.metric = "loss"

    c.generate.num_samples = 16
    c.generate.max_new_tokens = 256
    return c
