"""Linear probe vs full fine-tuning vs top-2 layers vs layer-wise lr decay vs LoRA with the
packaged DINOv2-S/14 on Fashion-MNIST and on ELPV solar cells, binary and 4-grade (see
README.md in this folder).

  python -m experiments.run experiments/vision_transfer [--quick] --prune-checkpoints
  python -m experiments.report experiments/vision_transfer [--quick]

Fashion-MNIST ships only its 60k train images and ELPV is one set of 2,624 cells, so the
reported split is a holdout carved from train (`data.holdout_rows`, stratified by class —
by grade x cell type for ELPV — and the same rows for every seed and setting). There is no
second split to select on, so the quick sweep tunes nothing on it: one lr per setting, fixed
in advance, and one eval at the last step (no best-checkpoint pick).
"""

from experiments.sweep import Setting, Sweep

SEEDS = (0, 1, 2)

# Full study (sized for one GPU, not run here): 224x224 images (a 16x16 patch grid, the
# pretraining size), batch 64, augmentation on (the configs' random resized crop + flip).
# Fashion-MNIST: 54k train / 6k holdout, ~5 epochs. ELPV: 1,968 train / 656 holdout
# (Deitsch et al.'s 75/25), ~30 epochs.
TASKS = {
    "fashion_mnist": {"data.holdout_rows": 6000, "train.max_steps": 4000},
    "elpv_binary": {"train.max_steps": 1000},
    "elpv_grades": {"train.max_steps": 1000},
}
EVALS_PER_RUN = 10
FULL = {"data.image_size": 224, "train.batch_size": 64}

# Each setting's lr grid (full study); frozen-backbone methods need far larger lrs.
LR_GRID = {
    "linear_probe": (1e-3, 3e-3, 1e-2),
    "full": (2e-5, 5e-5, 1e-4),
    "top2": (1e-4, 3e-4, 1e-3),
    "llrd": (5e-5, 1e-4, 2e-4),
    "lora": (3e-4, 1e-3, 3e-3),
}
# Quick (CPU): one lr per setting, the peft_glue quick study's pick for the same recipe on a
# 22M-param encoder, one notch lower for full / LLRD (ViTs are less forgiving of high lrs).
QUICK_LR = {
    "linear_probe": 3e-3,
    "full": 1e-4,
    "top2": 3e-4,
    "llrd": 2e-4,
    "lora": 1e-3,
}
# In the order the quick study ran them across all tasks (README): the two that matter most
# first, then the cheaper ones, so a sweep cut short still answers the main question.
PRESETS = {
    "full": {"optim.preset": "full"},
    "linear_probe": {"optim.preset": "linear_probe"},  # the classifier on CLS + mean patch
    "top2": {"optim.preset": "top_k_layers", "optim.top_k": 2},  # last 2 of 12 blocks + head
    # Rank 8 on the query and value projections, alpha = rank (scale 1), as in peft_glue.
    "lora": {"optim.preset": "lora", "peft.rank": 8, "peft.alpha": 8.0},
    "llrd": {"optim.preset": "llrd", "optim.llrd_decay": 0.75},
}

COMMON = {
    "model.head_bias_init": "prior",  # ELPV is 71% / 29% (binary) and 58/11/4/27 (grades)
    "data.stratify": True,
    "data.eval_split": "holdout",
    "train.keep_checkpoints": 1,
    "train.progress": False,
}


def _once(steps: int) -> dict:
    """Evaluate and checkpoint once, at the last step: the reported number is the end."""
    return {"train.eval_every": steps, "train.checkpoint_every": steps}


# Quick: what a 2-core CPU shared with five other jobs affords (a first attempt at 56x56 /
# 84x84 and 80 steps ran at 17 s/step under that load): Fashion-MNIST's 28x28 source upscaled
# to 42 (3x3 patches of 14), ELPV's 300x300 cells down to 56 (4x4 patches), 48 steps of 16 —
# under an epoch, so augmentation is off (no image is seen twice).
QUICK_BATCH = 16
QUICK_STEPS = 48
QUICK_TASKS = {
    "fashion_mnist": {"data.image_size": 42, "data.holdout_rows": 500},
    "elpv_binary": {"data.image_size": 56},
    "elpv_grades": {"data.image_size": 56},
}
QUICK_SEEDS = (0, 1)
QUICK = {
    "data.augment": False,
    "train.batch_size": QUICK_BATCH,
    "train.max_steps": QUICK_STEPS,
    "train.log_every": 8,
    **_once(QUICK_STEPS),
}
QUICK_NOTES = (
    f"--quick (2-core CPU shared with other jobs): {QUICK_STEPS} steps of batch {QUICK_BATCH} "
    f"({QUICK_STEPS * QUICK_BATCH} images: 1.4% of a Fashion-MNIST epoch, 0.39 of an ELPV "
    "one); Fashion-MNIST at 42x42 with a 500-image stratified holdout; ELPV at 56x56 on the "
    "full 656-cell stratified holdout; no augmentation; one lr per setting (no selection); "
    f"{len(QUICK_SEEDS)} seeds; one eval, at the last step. The full study: 224x224, batch 64, "
    "augmentation, 4,000 / 1,000 steps, 3 lrs x 3 seeds."
)


def get_sweep(quick: bool = False) -> Sweep:
    """The study; `quick` is the CPU variant (see QUICK_NOTES)."""
    if quick:
        settings = {
            name: Setting(overrides=PRESETS[name], grid={"optim.lr": (QUICK_LR[name],)})
            for name in PRESETS
        }
        return Sweep(
            config="experiments/vision_transfer/config.py:{task}",
            tasks=QUICK_TASKS,
            settings=settings,
            seeds=QUICK_SEEDS,
            overrides={**COMMON, **QUICK},
            notes=QUICK_NOTES,
        )
    settings = {
        name: Setting(overrides=PRESETS[name], grid={"optim.lr": LR_GRID[name]}) for name in PRESETS
    }
    tasks = {
        task: {
            **overrides,
            "train.eval_every": overrides["train.max_steps"] // EVALS_PER_RUN,
            "train.checkpoint_every": overrides["train.max_steps"] // EVALS_PER_RUN,
        }
        for task, overrides in TASKS.items()
    }
    return Sweep(
        config="experiments/vision_transfer/config.py:{task}",
        tasks=tasks,
        settings=settings,
        seeds=SEEDS,
        overrides={**COMMON, **FULL},
    )
