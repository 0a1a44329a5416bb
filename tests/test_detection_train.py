"""End-to-end detection on a tiny random DINOv2 and real cut-and-paste images: train + eval
through the builder and loop (COCO mAP), predict (COCO results + pictures), export (the
backbone loads in transformers, the head sits in its own file), and `model.init=random`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from PIL import Image

from finetune_jax.config import base_config
from finetune_jax.eval import run_eval
from finetune_jax.export import export
from finetune_jax.hf import model_files
from finetune_jax.models import lora as lora_lib
from finetune_jax.models import vit
from finetune_jax.predict import predict
from finetune_jax.train import train
from finetune_jax.training import builder
from tests.helpers import SHARED_DATA, tiny_config
from tests.test_image_train import tiny_dinov2_dir  # noqa: F401 (a fixture)

CUTPASTE = SHARED_DATA / "cutpaste_fashion_elpv"


def detection_config(model_dir):
    """The shared cut-and-paste data, 16 train / 8 validation images at 28 x 28, 4 steps."""
    config = tiny_config(model_dir, CUTPASTE, max_steps=4, eval_every=2, checkpoint_every=2)
    text_defaults = base_config().data  # tiny_config's text lengths: not a detection key
    config.data.max_length, config.data.buckets = text_defaults.max_length, text_defaults.buckets
    config.data.task = "cutpaste_detection"
    config.data.image_size = 28
    config.data.max_boxes = 4
    config.data.max_train_rows = 16
    config.data.max_eval_rows = 8
    config.optim.lr = 1e-3
    return config


@pytest.fixture(scope="module")
def trained(tiny_dinov2_dir, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("detection_run")
    config = detection_config(tiny_dinov2_dir)
    return config, workdir, train(config, str(workdir))


def test_train_and_eval_report_coco_map(trained):
    config, workdir, summary = trained
    assert summary["final_step"] == 4 and summary["metric"] == "map"
    evals = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4] and evals[-1]["examples"] == 8
    assert all(0 <= e[m] <= 1 for e in evals for m in ("map", "map_50", "map_75"))
    assert all(np.isfinite(e["loss"]) for e in evals)
    result = run_eval(config, str(workdir), "validation", which=str(summary["best_step"]))
    best = next(e for e in evals if e["step"] == summary["best_step"])
    assert result["map"] == pytest.approx(best["map"]) and result["loss"] == pytest.approx(
        best["loss"], rel=1e-5
    )


def test_predict_writes_coco_results_and_pictures(trained, tmp_path):
    config, workdir, _ = trained
    images = sorted((CUTPASTE / "validation" / "images").iterdir())[:3]
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    out = tmp_path / "detections.jsonl"
    summary = predict(config, str(workdir), str(listing), str(out), pictures=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) == 3
    names = json.loads((workdir / "label_names.json").read_text())
    for number, (row, image) in enumerate(zip(rows, images), 1):
        assert row["path"] == str(image) and len(row["detections"]) <= config.data.max_detections
        for d in row["detections"]:
            assert d["image_id"] == number and d["file_name"] == image.name
            assert d["category"] in names and d["category_id"] == names.index(d["category"]) + 1
            x, y, w, h = d["bbox"]
            assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= 224.01 and y + h <= 224.01
        scores = [d["score"] for d in row["detections"]]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
        assert Image.open(row["picture"]).size == (224, 224)
    assert rows[0]["picture"] == str(tmp_path / "detections_files" / images[0].name)


def test_export_loads_the_backbone_in_transformers_and_keeps_the_head(trained, tmp_path):
    config, workdir, summary = trained
    out = tmp_path / "hf"
    export(config, str(workdir), str(out))
    model, info = transformers.Dinov2Model.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    exported = json.loads((out / "config.json").read_text())
    assert (
        exported["architectures"] == ["Dinov2Model"] and exported["id2label"]["0"] == "t-shirt/top"
    )
    setup = builder.build(config, workdir=str(workdir))
    _, params = setup.restore_params(str(workdir))
    params = jax.device_get(params)
    head = safetensors.numpy.load_file(out / "detection_head.safetensors")
    ours = {k: v for k, v in lora_lib.flat_paths(params).items() if k.startswith("detection_head/")}
    assert sorted(head) == sorted(k.replace("/", ".") for k in ours)
    for path, value in ours.items():
        np.testing.assert_array_equal(head[path.replace("/", ".")], value)
    pixels = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    backbone = vit.ViTModel(setup.model_config)
    ours_hidden = backbone.apply({"params": params["dinov2"]}, pixels)
    with torch.no_grad():
        theirs = model(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))
        ).last_hidden_state
    np.testing.assert_allclose(np.asarray(ours_hidden), theirs.numpy(), atol=1e-4)


def test_random_init_reads_no_weights(tiny_dinov2_dir, monkeypatch):  # noqa: F811
    config = detection_config(tiny_dinov2_dir)
    config.model.init = "random"
    setup = builder.build(config)
    checkpoint = safetensors.numpy.load_file(tiny_dinov2_dir / "model.safetensors")

    def no_weights(*args, **kwargs):
        raise AssertionError("model.init=random read the checkpoint")

    monkeypatch.setattr(model_files, "open_tensors", no_weights)
    random = lora_lib.flat_paths(jax.device_get(setup.pretrained_params()))
    assert sorted(random) == sorted(lora_lib.flat_paths(setup.abstract_params))
    query = checkpoint["encoder.layer.0.attention.attention.query.weight"]  # [out, in]
    ours = random["dinov2/encoder/layer_0/attention/query/kernel"]  # [in, heads, head_dim]
    assert ours.shape == (query.shape[1], 4, 8)
    assert not np.allclose(ours.reshape(query.shape[1], -1), query.T, atol=1e-3)
    # DINOv2's init: LayerScale at its config value, norms at 1, biases at 0.
    np.testing.assert_array_equal(random["dinov2/encoder/layer_0/layer_scale1/lambda1"], 1.0)
    np.testing.assert_array_equal(random["dinov2/layernorm/scale"], 1.0)
    config.model.init = "scratch"
    with pytest.raises(ValueError, match="model.init='scratch'"):
        builder.build(config)
