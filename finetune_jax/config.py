"""The config schema: every key a run understands, with its default.

Experiment files in `configs/` start from `base_config()` and set values, so a typo in a
config file or on the command line (`--config.optim.lrr=3e-5`) is an error instead of a
silently ignored key: the ConfigDicts are locked after construction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults for a sequence-classification fine-tune; `configs/**.py` override them."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "all-minilm-l6-v2"  # local HF dir, packaged alias, or hub id
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.remat = "none"  # none | full | dots_saveable: recompute activations in backward
    c.model.dropout = -1.0  # <0: keep the pretrained config's dropout
    # The new head's bias: "zeros" (as HF) or "prior", the train labels' prior — their mean
    # for regression, log class frequencies for classification — so the first steps learn
    # the task instead of the label offset (STS-B's scores average 2.7, not 0).
    c.model.head_bias_init = "zeros"

    c.data = ml_collections.ConfigDict()
    c.data.task = "sst2"
    c.data.dir = ""  # local dir with the task's files; "" = load from the HF hub
    c.data.max_length = 64
    c.data.buckets = (16, 32, 64)  # padded lengths: bounds the number of compiled shapes
    c.data.eval_split = "validation"  # evaluated every train.eval_every steps; picks "best"
    # Selection set: this many train rows are held out (fixed by split_seed, not by seed) and
    # evaluated as split "holdout"; set eval_split="holdout" to select on them.
    c.data.holdout_rows = 0
    c.data.max_train_rows = 0  # train on a random subset of this many rows; 0 = all
    c.data.max_eval_rows = 0  # evaluate a random subset of this many rows; 0 = all
    c.data.split_seed = 0  # draws holdout and subsets; the same for every seed of a sweep
    c.data.packing = True  # chat tasks: several examples per max_length row

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.schedule = "linear"  # linear | cosine | constant (after warmup)
    c.optim.warmup_fraction = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0  # global norm over trainable leaves; <=0 disables
    # Which params train, and at what lr multiplier: a preset, or explicit rules.
    c.optim.preset = "full"  # full | linear_probe | bitfit | top_k_layers | llrd | lora | rules
    c.optim.top_k = 2  # for top_k_layers
    c.optim.llrd_decay = 0.8  # for llrd: layer i of N gets decay**(N - i)
    c.optim.head = r"(classifier|bert/pooler)/.*"  # new / task-specific params
    c.optim.layer = r".*/layer_(\d+)/.*"  # finds a param's layer index (group 1)
    # (regex, label) pairs used when preset == "rules"; label: "trainable", "frozen" or an
    # lr multiplier (float). First full match wins; every param must be matched.
    c.optim.rules = ()
    # (regex, bool): which params get weight decay (none for biases and norms).
    c.optim.decay_rules = (
        (r".*/bias", False),
        (r".*LayerNorm/.*", False),
        (r".*norm/.*", False),
        (r".*", True),
    )

    c.peft = ml_collections.ConfigDict()
    # LoRA on the kernels whose '/'-joined param path full-matches `targets`; rank 0 = off.
    # Train it with optim.preset=lora (LoRA params + head) or explicit optim.rules.
    c.peft.rank = 0
    c.peft.alpha = 16.0  # the update is scaled by alpha / rank
    c.peft.dropout = 0.0  # on the LoRA branch's input only
    # BERT's query/value; for Llama e.g. r".*/self_attn/(q_proj|v_proj)/kernel".
    c.peft.targets = r".*/attention/(query|value)/kernel"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global, over all processes
    c.train.microbatches = (
        1  # gradient accumulation inside the step: batch_size / microbatches each
    )
    c.train.max_steps = 1000
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2  # the last K, plus the best by train.metric
    c.train.metric = ""  # "" = the task's main metric
    c.train.patience = 0  # evals without improvement before stopping; 0 = never stop early
    c.train.async_checkpoint = True
    c.train.nonfinite = (
        "halt"  # halt: stop with an error naming step and param | skip: drop the update
    )
    c.train.progress = True
    # After the last step, evaluate the best checkpoint (by train.metric on data.eval_split)
    # on this split, e.g. "validation" when selecting on "holdout"; "" = skip.
    c.train.final_split = ""

    c.generate = ml_collections.ConfigDict()
    # Sample generations written by the eval script for causal-LM tasks.
    c.generate.num_samples = 16  # prompts of the eval split to generate for; 0 = none
    c.generate.max_new_tokens = 256
    c.generate.temperature = 0.0  # 0 = greedy
    c.generate.top_k = 0  # sample among the k most likely tokens; 0 = all
    c.generate.batch_size = 8
    c.generate.seed = 0

    c.mesh = ml_collections.ConfigDict()
    # Mesh axes over all devices of all processes; one size may be -1 (= the rest).
    # data: pure data parallel; fsdp: batch split AND params/optimizer state sharded (ZeRO-3
    # style); tensor: heads / MLP / vocab split inside each layer (Megatron style).
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.sharding = ml_collections.ConfigDict()
    # Logical axis name -> mesh axis (or None = replicated), first match wins.
    c.sharding.rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("activation_embed", None),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("kv", None),
        ("mlp", "tensor"),
        ("position", None),
        ("token_type", None),
        ("classes", None),
        ("lora_rank", None),  # LoRA's rank dim; its other dims follow the base weight's
    )
    c.lock()
    return c


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], source: str
) -> ml_collections.ConfigDict:
    """Sets dotted keys (`optim.lr`) in a locked config, in place; returns it.

    An unknown key or section, or a value of the wrong type, is an error naming the key and
    `source` (where the override was written, e.g. "sweep experiments/x/sweep.py").
    """
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = config
        for i, part in enumerate(sections):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise KeyError(
                    f"unknown config key {key!r} in {source}: "
                    f"{'.'.join(sections[: i + 1])!r} is not a config section"
                )
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise KeyError(
                f"unknown config key {key!r} in {source}; keys there: {', '.join(known)}"
            )
        try:
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except TypeError as e:
            raise TypeError(f"config key {key!r} in {source}: {e}") from None
    return config


def ensure_writable_workdir(workdir: str) -> None:
    """Fail at start, not at the first checkpoint, when the workdir cannot be written."""
    # One probe file per process: several processes may share the workdir.
    probe = os.path.join(workdir, f".write-test-{os.uname().nodename}-{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir!r} is not a writable directory ({e.strerror or e}); pass "
            "--workdir=<a directory this user can create and write>"
        ) from None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config as JSON into the workdir (the record of what ran)."""
    if jax.process_index() != 0:
        return os.path.join(workdir, "config.json")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path
