"""Named-entity recognition: the packaged all-MiniLM-L6-v2 (6-layer BERT, uncased) with a
token-classification head on WNUT-16-style tweets (10 entity types, IOB2 tags).

  python -m finetune_jax.train --config=configs/ner/wnut16_minilm.py --workdir=runs/wnut16
  python -m finetune_jax.eval --workdir=runs/wnut16 --split=validation
  python -m finetune_jax.predict --workdir=runs/wnut16 --input=sentences.jsonl --output=ents.jsonl

The recipe of the transformers + torch peer (`../shared/tools/peer_torch_ner.py`): labels on
the first word piece of each word, AdamW lr 1e-4 with 10% warmup then linear decay, batch 16,
4 epochs of the 1,700 train sentences = 428 steps. Selection and the README figure are on
validation entity micro-F1 (seqeval's semantics), the metric the peer reports.
"""

from finetune_jax.config import base_config


def get_config():
    config = base_config()
    config.data.task = "wnut16"
    config.data.dir = "../shared/data/ner_wnut16"  # train.conll / validation.conll
    config.data.max_length = 80  # the longest train sentence is 75 pieces, validation 58
    # Batches padded to the smallest bucket holding their longest row (a compile each).
    config.data.buckets = (32, 40, 48, 56, 64, 80)
    config.optim.lr = 1e-4
    config.train.batch_size = 16
    config.train.max_steps = 428  # 4 epochs
    config.train.eval_every = 107  # once an epoch
    config.train.checkpoint_every = 107
    config.train.log_every = 20
    return config
