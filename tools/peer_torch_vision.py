"""Peer baseline: fine-tune a DINOv2 / ViT directory on Fashion-MNIST with HF transformers +
PyTorch (`AutoModelForImageClassification`, AdamW, linear schedule), so images/s can be
compared with ours on one machine in one sitting. `tools/bench.py --torch_peer=` runs it
right after our own step with the same model directory, batch, image size and data:

  python tools/peer_torch_vision.py --model_dir DIR --fashion_mnist ../shared/data/fashion_mnist \\
      --image_size 112 --batch 16 --steps 13

Images are read and preprocessed by our IDX reader and the model's own image processor (set
to `--image_size` squares with its resize-to-crop ratio by our `resize_to_size`), before the
timer starts, so the figure is the
train step alone, as `tools/bench.py` times ours. Needs torch (test-only here) and
transformers; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax import tasks  # noqa: E402
from finetune_jax.data import idx_files, image_preprocess  # noqa: E402


def fashion_mnist(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Train images [N, 28, 28] uint8 and labels [N], read as our IDX task reads them."""
    task = tasks.get_task("fashion_mnist")
    paths = [os.path.join(data_dir, name) for name in task.files["train"]]
    images, labels = idx_files.read_images_and_labels(*paths, len(task.label_names))
    return images, labels.astype(np.int64)


def sized_processor(model_dir: str, image_size: int):
    """The directory's image processor producing `image_size` squares, as ours does."""
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    image_preprocess.resize_to_size(processor, image_size)
    return processor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True, help="HF Dinov2Model / ViTModel directory")
    ap.add_argument("--fashion_mnist", required=True, help="dir with the train IDX files")
    ap.add_argument("--image_size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mode", default="full", choices=["full", "linear_probe"])
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    images, labels = fashion_mnist(a.fashion_mnist)
    model = transformers.AutoModelForImageClassification.from_pretrained(a.model_dir, num_labels=10)
    if a.mode == "linear_probe":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier")
    processor = sized_processor(a.model_dir, a.image_size)
    order = np.random.default_rng(a.seed).permutation(len(images))
    batches = []
    for step in range(a.steps):
        rows = order[step * a.batch : (step + 1) * a.batch]
        rgb = [Image.fromarray(images[i]).convert("RGB") for i in rows]
        pixels = processor(rgb, return_tensors="pt")["pixel_values"]
        batches.append((pixels, torch.from_numpy(labels[rows])))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * a.steps), a.steps)
    model.train()
    times = []
    for pixels, target in batches:
        start = time.perf_counter()
        loss = model(pixel_values=pixels, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # ours clips at 1.0 too
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    step_s = float(np.mean(steady))
    print(
        json.dumps(
            {
                "peer": "transformers+torch",
                "model": type(model).__name__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "mode": a.mode,
                "steps": a.steps,
                "batch": a.batch,
                "image_size": list(pixels.shape[2:]),
                "first_step_s": round(times[0], 3),
                "steady_step_s": round(step_s, 6),
                "steady_samples_per_s": round(a.batch / step_s, 2),
                "final_loss": round(float(loss), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
