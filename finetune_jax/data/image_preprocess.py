"""Images -> the model's `pixel_values`: transformers' image processor of the model directory
(resize, centre crop, rescale, normalise), at the run's image size, plus seeded train-time
augmentation (random resized crop, horizontal flip).

The processor is the model's own `preprocessor_config.json`, loaded by transformers, so the
numbers match what HF pipelines feed the same model; only its output size is changed (to
`data.image_size`, keeping the processor's resize-to-crop ratio, e.g. DINOv2's 256 -> 224).
Augmentation replaces resize + crop by a random crop of the original resized straight to the
output size, then the processor rescales and normalises it. Its randomness is drawn from
`(seed, epoch, example index)` alone, so a resumed run, or another process count, sees the
same crops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


def load_processor(model_dir: str, image_size: int = 0):
    """The model dir's image processor, set to output `image_size` squares (0 = as saved).

    This processor is also what an export saves, so the exported model's
    preprocessor_config.json describes the size it was fine-tuned at.
    """
    import transformers  # heavy; only image runs need it

    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    except OSError as e:
        raise ValueError(
            f"model {model_dir!r} has no image processor (preprocessor_config.json): {e}"
        ) from e
    if image_size > 0:
        resize_to_size(processor, image_size)
    return processor


def resize_to_size(processor, image_size: int) -> None:
    """Sets `processor` to produce `image_size` x `image_size` pixels."""
    crop = getattr(processor, "crop_size", None) if processor.do_center_crop else None
    if crop:  # resize the shortest edge by the saved ratio, then centre-crop
        shortest = processor.size.get("shortest_edge") or min(processor.size.values())
        ratio = shortest / min(crop["height"], crop["width"])
        processor.size = {"shortest_edge": int(round(image_size * ratio))}
        processor.crop_size = {"height": image_size, "width": image_size}
    else:  # e.g. ViT: resize straight to the output size
        processor.size = {"height": image_size, "width": image_size}


def output_size(processor) -> int:
    """The square side the processor outputs."""
    if processor.do_center_crop and getattr(processor, "crop_size", None):
        size = processor.crop_size
    else:
        size = processor.size
    if size.get("height") != size.get("width"):
        raise ValueError(f"image processor outputs {size}; set data.image_size for squares")
    return int(size["height"])


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`) + flip."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"data.augment_scale={self.scale}: need 0 < low <= high <= 1")


def crop_box(
    width: int, height: int, augment: Augment, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop draws
    it (10 tries, then the centre crop of the clamped aspect ratio)."""
    area = width * height
    log_ratio = (math.log(augment.ratio[0]), math.log(augment.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*augment.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = min(max(width / height, augment.ratio[0]), augment.ratio[1])
    w, h = (width, int(round(width / aspect))) if width / height < aspect else (
        int(round(height * aspect)), height)  # fmt: skip
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment_image(
    image: Image.Image, size: int, augment: Augment, rng: np.random.Generator
) -> Image.Image:
    """A random resized crop of `image` at `size` x `size`, flipped half the time."""
    box = crop_box(image.width, image.height, augment, rng)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if augment.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of one example in one epoch."""
    return np.random.default_rng([seed, epoch, index])


def pixel_values(
    processor,
    images: Sequence[Image.Image],
    augment: Augment | None = None,
    rngs: Sequence[np.random.Generator] = (),
) -> np.ndarray:
    """float32 [B, H, W, 3] (channels last) for `images`; augmented when `augment` is given
    (one generator per image), else the processor's own resize and centre crop."""
    if augment is None:
        out = processor(images=list(images), return_tensors="np")["pixel_values"]
        return _channels_last(out)
    size = output_size(processor)
    return normalised(
        processor, [augment_image(im, size, augment, rng) for im, rng in zip(images, rngs)]
    )


def normalised(processor, images: Sequence[Image.Image]) -> np.ndarray:
    """float32 [B, H, W, 3] (channels last) of images already at the output size: the
    processor's rescale and normalisation only (no resize, no crop)."""
    out = processor(images=list(images), do_resize=False, do_center_crop=False, return_tensors="np")
    return _channels_last(out["pixel_values"])


def _channels_last(pixels_BCHW) -> np.ndarray:
    # HF processors emit [B, C, H, W]; the models here take channels last.
    return np.ascontiguousarray(np.asarray(pixels_BCHW, np.float32).transpose(0, 2, 3, 1))
