"""Zero-shot vs LoRA vs full fine-tuning vs decoder-only fine-tuning (encoder frozen) of the
packaged Whisper tiny.en on synthesised spoken commands (see README.md in this folder).

  python -m experiments.run experiments/speech_commands [--quick]
  python -m experiments.report experiments/speech_commands [--quick]

Selection (checkpoint, and lr where a grid has several) is on a holdout of train clips
(`data.holdout_rows`, the same clips for every seed); the reported number is the selected
checkpoint's WER on validation clips nothing was chosen on (`train.final_split`). Zero-shot
is a run of `train.max_steps=0`: the pretrained model evaluated as step 0.
"""

from experiments.sweep import Setting, Sweep

SEEDS = (0, 1, 2)

# Which params train: presets, or rules as data (first full match wins).
PRESETS = {
    "zero_shot": {"train.max_steps": 0, "optim.preset": "full", "peft.rank": 0},
    # Rank 16 on every attention and MLP projection (the config file's LoRA).
    "lora": {"optim.preset": "lora"},
    "full": {"optim.preset": "full", "peft.rank": 0},
    "decoder_only": {
        "optim.preset": "rules",
        "optim.rules": ((r"model/encoder/.*", "frozen"), (r".*", "trainable")),
        "peft.rank": 0,
    },
}
LR_GRID = {
    "zero_shot": (0.0,),
    "lora": (3e-4, 1e-3, 3e-3),
    "full": (3e-6, 1e-5, 3e-5),
    "decoder_only": (3e-6, 1e-5, 3e-5),
}
# Quick (CPU): one lr per setting, at the high end of its grid, since the runs are short.
QUICK_LR_GRID = {"zero_shot": (0.0,), "lora": (1e-3,), "full": (3e-5,), "decoder_only": (3e-5,)}

COMMON = {
    "data.eval_split": "holdout",
    "train.final_split": "validation",
    "train.keep_checkpoints": 1,
    "train.progress": False,
}
FULL = {
    "data.holdout_rows": 200,
    "data.max_eval_rows": 0,  # all 200 validation clips
    "train.max_steps": 600,  # 6 epochs of the 1,400 remaining train clips at batch 16
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
}

QUICK_SEEDS = (0, 1)
QUICK_STEPS = 40
QUICK_BATCH = 8
QUICK_HOLDOUT = 32
QUICK_EVAL = 100
QUICK = {
    "data.holdout_rows": QUICK_HOLDOUT,
    "data.max_eval_rows": QUICK_EVAL,
    "train.batch_size": QUICK_BATCH,
    "train.max_steps": QUICK_STEPS,
    "train.eval_every": QUICK_STEPS // 2,
    "train.checkpoint_every": QUICK_STEPS // 2,
    "train.log_every": 5,
}
QUICK_NOTES = (
    f"--quick (2-core CPU): {QUICK_STEPS} steps of batch {QUICK_BATCH} "
    f"({QUICK_STEPS * QUICK_BATCH} clips, under one epoch) instead of 600 of 16; one lr per "
    f"setting; a {QUICK_HOLDOUT}-clip holdout evaluated every {QUICK_STEPS // 2} steps; "
    f"validation WER on {QUICK_EVAL} of the 200 clips (a fixed subset); seeds "
    f"{', '.join(map(str, QUICK_SEEDS))}. 8 s audio window (the config file's) in both."
)


def get_sweep(quick: bool = False) -> Sweep:
    """The study; `quick` is the CPU variant (see QUICK_NOTES)."""
    grid = QUICK_LR_GRID if quick else LR_GRID
    settings = {
        name: Setting(overrides=PRESETS[name], grid={"optim.lr": grid[name]}) for name in PRESETS
    }
    return Sweep(
        config="configs/speech/whisper_tiny_commands.py",
        tasks={"commands": {}},
        settings=settings,
        seeds=QUICK_SEEDS if quick else SEEDS,
        overrides={**COMMON, **(QUICK if quick else FULL)},
        notes=QUICK_NOTES if quick else "",
    )
