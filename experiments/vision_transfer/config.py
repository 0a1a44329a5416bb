"""The vision_transfer study's config slot: a task name -> the shipped config it trains.

  python -m finetune_jax.train --config=experiments/vision_transfer/config.py:elpv_binary \\
      --workdir=runs/elpv_binary

Tasks: fashion_mnist (configs/vision/fashion_mnist_dinov2.py), elpv_binary and elpv_grades
(configs/vision/elpv_dinov2.py). The recipe comes from the sweep's settings (optim.preset).
"""

import importlib.util
from pathlib import Path

CONFIGS = {
    "fashion_mnist": ("fashion_mnist_dinov2.py", "full"),
    "elpv_binary": ("elpv_dinov2.py", "binary,full"),
    "elpv_grades": ("elpv_dinov2.py", "grades,full"),
}


def get_config(task: str = "fashion_mnist"):
    if task not in CONFIGS:
        raise KeyError(f"unknown vision_transfer task {task!r}; tasks: {', '.join(CONFIGS)}")
    name, arg = CONFIGS[task]
    path = Path(__file__).resolve().parents[2] / "configs" / "vision" / name
    spec = importlib.util.spec_from_file_location(f"_vision_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
