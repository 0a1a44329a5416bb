"""End-to-end image classification on a tiny random DINOv2 and real Fashion-MNIST rows:
train + eval through builder and loop, bitwise-exact resume, LoRA, export to transformers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from finetune_jax.config import base_config
from finetune_jax.data.text_sources import DataError
from finetune_jax.eval import run_eval
from finetune_jax.export import export
from finetune_jax.train import train
from finetune_jax.training import builder
from tests.helpers import SHARED_DATA, tiny_config
from tests.test_train import final_state, train_losses


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory):
    """A tiny random bare Dinov2Model (as the packaged one is) + a DINOv2 image processor."""
    out_dir = tmp_path_factory.mktemp("tiny_dinov2")
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=28,
        patch_size=7,
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(out_dir, safe_serialization=True)
    transformers.BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out_dir)
    return out_dir


def image_config(model_dir, **train_values):
    """Fashion-MNIST, 64 train rows and a 32-row holdout, 28x28 inputs, 6 steps."""
    config = tiny_config(model_dir, SHARED_DATA / "fashion_mnist", **train_values)
    text_defaults = base_config().data  # tiny_config's text lengths: not an image task's keys
    config.data.max_length, config.data.buckets = text_defaults.max_length, text_defaults.buckets
    config.data.task = "fashion_mnist"
    config.data.image_size = 28
    config.data.holdout_rows = 32
    config.data.max_train_rows = 64
    config.data.eval_split = "holdout"
    config.optim.lr = 1e-3
    return config


def test_train_and_eval_an_image_classifier(tiny_dinov2_dir, tmp_path):
    config = image_config(tiny_dinov2_dir)
    summary = train(config, str(tmp_path))
    assert summary["final_step"] == 6 and summary["compiled_train_shapes"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["metric"] == "accuracy"
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [3, 6] and evals[-1]["examples"] == 32
    result = run_eval(config, str(tmp_path), "holdout", which=str(summary["best_step"]))
    best = next(e for e in evals if e["step"] == summary["best_step"])
    assert result["accuracy"] == best["accuracy"]
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert all(np.isfinite(losses))


def test_resumed_image_run_is_bitwise_identical(tiny_dinov2_dir, tmp_path):
    config = image_config(tiny_dinov2_dir)  # augmentation on (the default)
    train(config, str(tmp_path / "straight"))
    train(config, str(tmp_path / "resumed"), until_step=3)
    train(config, str(tmp_path / "resumed"))
    a, b = final_state(config, tmp_path / "straight"), final_state(config, tmp_path / "resumed")
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    """A tiny random bare ViTModel (pooler included, as hub ViTs are) + a ViT processor."""
    out_dir = tmp_path_factory.mktemp("tiny_vit")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
    )
    torch.manual_seed(1)
    transformers.ViTModel(config).save_pretrained(out_dir, safe_serialization=True)
    transformers.ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(out_dir)
    return out_dir


def export_matches_transformers(config, workdir, out, step: str) -> dict:
    """Exports step `step` of `workdir` to `out`, loads it with transformers' Auto classes
    and checks: the processor makes our pixels, the logits equal ours (params restored from
    the checkpoint, LoRA unmerged), no weight is missing or left over. Returns config.json."""
    export(config, str(workdir), str(out), which=step)
    exp = builder.build(config)
    _, params = exp.restore_params(str(workdir), step)
    split = exp.data.load("holdout")
    batch = next(exp.data.eval_batches(split))
    ours = np.asarray(exp.module.apply({"params": jax.device_get(params)}, batch["pixel_values"]))
    model, loading = transformers.AutoModelForImageClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(loading.values()), loading  # missing / unexpected / mismatched keys
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    images = [split.image(i) for i in range(len(batch["labels"]))]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(
        pixels.numpy().transpose(0, 2, 3, 1), batch["pixel_values"], atol=1e-6
    )
    with torch.no_grad():
        theirs = model.eval()(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    hf_config = json.loads((out / "config.json").read_text())
    want = {str(i): name for i, name in enumerate(exp.data.task.label_names)}
    assert hf_config["id2label"] == want and hf_config["num_labels"] == len(want)
    return hf_config


def test_exported_lora_image_classifier_loads_in_transformers(tiny_dinov2_dir, tmp_path):
    config = image_config(tiny_dinov2_dir, max_steps=3)
    config.peft.rank = 4
    config.optim.preset = "lora"
    out = tmp_path / "hf"
    train(config, str(tmp_path / "run"))
    hf_config = export_matches_transformers(config, tmp_path / "run", out, "3")
    assert hf_config["architectures"] == ["Dinov2ForImageClassification"]
    assert hf_config["id2label"]["0"] == "T-shirt/top"
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["crop_size"] == {"height": 28, "width": 28}  # the size it was tuned at


@pytest.mark.parametrize(
    "model_dir, architecture, scan_layers",
    [
        ("tiny_dinov2_dir", "Dinov2ForImageClassification", True),  # as configs/vision do
        ("tiny_vit_dir", "ViTForImageClassification", False),
    ],
)
def test_exported_full_finetuned_classifier_loads_in_transformers(
    model_dir, architecture, scan_layers, request, tmp_path
):
    """Every weight trains (full): the exported DINOv2 (mask token written as zeros, which
    our model has no use for; layers scanned) and ViT load with nothing missing and give
    our logits."""
    config = image_config(request.getfixturevalue(model_dir), max_steps=2)
    config.optim.preset = "full"
    config.model.scan_layers = scan_layers
    train(config, str(tmp_path / "run"))
    hf_config = export_matches_transformers(config, tmp_path / "run", tmp_path / "hf", "2")
    assert hf_config["architectures"] == [architecture]


def test_an_unreadable_image_stops_the_run_before_step_1_or_is_skipped(tiny_dinov2_dir, tmp_path):
    """A corrupt file is named before any step runs (nothing trained, no checkpoint); with
    data.bad_images='skip' the same data trains without it."""
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "images" / "train" / ("cat", "dog")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    config = image_config(tiny_dinov2_dir, max_steps=2, eval_every=2, checkpoint_every=2)
    config.data.task, config.data.dir = "image_folder", str(tmp_path / "images")
    config.data.holdout_rows, config.data.max_train_rows = 4, 0
    # Which split holds it depends on the holdout's draw: both are checked before step 1.
    with pytest.raises(DataError, match=r"1 of \d+ \w+ images cannot be read: .*broken.png'"):
        train(config, str(tmp_path / "refused"))
    assert not (tmp_path / "refused" / "checkpoints").exists()
    config.data.bad_images = "skip"
    assert train(config, str(tmp_path / "skipped"))["final_step"] == 2
