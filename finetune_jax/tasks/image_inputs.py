"""What every task kind whose inputs are images shares: the `data.*` keys of an image source,
the model directory's image processor as the preprocessor, the unreadable-image policy, and a
head as wide as the task's classes. Image classification, detection and segmentation subclass
`ImageInputKind` and add their own."""

from __future__ import annotations

from typing import Any

from finetune_jax.data import image_checks, image_preprocess
from finetune_jax.tasks.kind import TaskKind

# config.data keys of an image source: where it is, its classes, the input size, augmentation.
IMAGE_DATA_KEYS = frozenset(
    {
        "hub_name",
        "label_names",
        "image_size",
        "augment",
        "augment_scale",
        "augment_flip",
        "image_column",
        "bad_images",
    }
)


class ImageInputKind(TaskKind):
    """A kind whose examples are images read through the model's image processor."""

    data_keys = IMAGE_DATA_KEYS

    def check_options(self, config, task) -> None:
        super().check_options(config, task)
        image_checks.check_policy(config.data.bad_images)

    def model_overrides(self, config, task) -> dict[str, Any]:
        return {"num_labels": task.num_labels}

    def preprocessor(self, config, model_ref):
        return image_preprocess.load_processor(model_ref, config.data.image_size)
