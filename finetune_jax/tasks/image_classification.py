"""Image classification kind: an image -> one class, on a ViT-style classification head;
the registered tasks (Fashion-MNIST, ELPV, folders, tables, hub datasets)."""

from __future__ import annotations

from typing import Any

from finetune_jax.data import image_loader, prediction_io
from finetune_jax.data.image_sources import ImageTask
from finetune_jax.evaluation import prediction
from finetune_jax.tasks import losses
from finetune_jax.tasks.image_inputs import ImageInputKind

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

IMAGE_TASKS: dict[str, ImageTask] = {
    # The official train and test (t10k) files; the shared copy holds train only: select on
    # data.eval_split="holdout", and evaluate split "test" once its files are in data.dir.
    "fashion_mnist": ImageTask(
        name="fashion_mnist",
        format="idx",
        label_names=FASHION_MNIST_CLASSES,
        files={
            "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        },
        subdir="fashion_mnist",
    ),
    "elpv_binary": ImageTask(
        name="elpv_binary", format="elpv", label_names=("functional", "defective")
    ),
    "elpv_grades": ImageTask(
        name="elpv_grades",
        format="elpv",
        label_names=("p=0", "p=1/3", "p=2/3", "p=1"),
        elpv_grades=True,
    ),
    "image_folder": ImageTask(name="image_folder", format="folder"),
    "image_table": ImageTask(name="image_table", format="table"),
    "image_hub": ImageTask(name="image_hub", format="hub"),
}


class ImageClassification(ImageInputKind):
    """Images decoded per batch through the model's image processor; accuracy."""

    name = "image_classification"
    tasks = IMAGE_TASKS
    predicts_with_head = True
    monitors = True
    label_prior = True
    data_keys = ImageInputKind.data_keys | {"label_column"}

    def resolve(self, config, task, saved_names=None):
        return image_loader.resolve_task(config, task, saved_names)

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return image_loader.ImageData(config, task, preprocessor, saved_names)

    def batch_spec(self, config, task):
        return image_loader.ImageData.batch_spec(config, task)

    def loss(self, task):
        return losses.classification_loss

    def prediction_split(self, setup, rows, source: str):
        split = prediction_io.image_split(rows, setup.config.data.image_column, source)
        return split, None, None

    def predictor(self, setup, params, source, threshold, files=None):
        return prediction.LabelPredictor(setup, params, source, threshold)

    def export_config(self, task) -> dict[str, Any]:
        return prediction.label_config(task)

    def monitor_reference(self, setup, reference: str, rows: int):
        raise ValueError(f"--reference={reference!r}: for image runs pass a folder or list file")


KIND = ImageClassification()
