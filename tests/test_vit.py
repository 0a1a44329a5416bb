"""ViT / DINOv2 contracts: parity with transformers (classifier logits and last hidden state, at
the pretraining size and at others, through the position-grid resize), bare-backbone
checkpoints, logical names, weight round trip, scan_layers, LoRA, dropout."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from finetune_jax import models
from finetune_jax.cluster import sharding
from finetune_jax.config import base_config
from finetune_jax.hf import loading, model_files
from finetune_jax.models import hf_mapping, vit, vit_config
from finetune_jax.models import lora as lora_lib

FAMILIES = {"vit": vit.VIT_FAMILY, "dinov2": vit.DINOV2_FAMILY}
# Pretraining size 28 (a 4x4 grid of 7-pixel patches); 42x35 resizes it to 6x5, and 31x38
# also leaves pixels beyond the last whole patch, which HF's Conv2d ignores.
SIZES = [(28, 28), (42, 35), (31, 38)]
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28)


def _hf_model(model_type: str, bare: bool):
    """A tiny random HF model with its norms, LayerScale and positions perturbed away from
    their init (ones, zeros, constant, tiny), so a mis-mapped one shows in the outputs."""
    if model_type == "vit":
        config = transformers.ViTConfig(**SHAPE, patch_size=7, intermediate_size=64, num_labels=3)
        model_cls = transformers.ViTModel if bare else transformers.ViTForImageClassification
    else:
        config = transformers.Dinov2Config(
            **SHAPE, patch_size=7, mlp_ratio=2, layerscale_value=0.5, num_labels=3
        )
        model_cls = transformers.Dinov2Model if bare else transformers.Dinov2ForImageClassification
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("norm", "layer_scale", "position", "cls_token")):
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=["vit", "dinov2"])
def tiny_classifier(request, tmp_path_factory):
    """(model_type, HF classifier, its directory)."""
    model = _hf_model(request.param, bare=False)
    out_dir = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model.save_pretrained(out_dir, safe_serialization=True)
    return request.param, model, out_dir


def _pixels(height: int, width: int, batch: int = 2) -> np.ndarray:
    """[B, C, H, W] float32, as HF takes them (ours: the NHWC transpose)."""
    return (
        np.random.default_rng(height * width)
        .normal(size=(batch, 3, height, width))
        .astype(np.float32)
    )


def _nhwc(pixels_BCHW: np.ndarray) -> np.ndarray:
    return pixels_BCHW.transpose(0, 2, 3, 1)


def _hf_forward(model, pixels_BCHW: np.ndarray):
    # ViT resizes its positions only when asked; DINOv2 always does for another grid.
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
    with torch.no_grad():
        return model(torch.from_numpy(pixels_BCHW), **kwargs)


def _load_with_hf_head(model_type: str, model_dir, **overrides):
    """Our classifier through the generic loader, the new head taken from the HF file."""
    config, module, params = loading.load_pretrained(
        FAMILIES[model_type], str(model_dir), "image_classification", num_labels=3, **overrides
    )
    hf = model_files.read_safetensors(model_dir)
    params["classifier"] = {"kernel": hf["classifier.weight"].T, "bias": hf["classifier.bias"]}
    return config, module, params


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_classifier_and_backbone_match_transformers(tiny_classifier, size):
    model_type, model, model_dir = tiny_classifier
    config, module, params = _load_with_hf_head(model_type, model_dir)
    pixels = _pixels(*size)
    logits = jax.jit(module.apply)({"params": params}, _nhwc(pixels))
    hidden = jax.jit(vit.ViTModel(config).apply)({"params": params[model_type]}, _nhwc(pixels))
    expected = _hf_forward(model, pixels).logits.numpy()
    backbone = getattr(model, model_type)
    kwargs = {"interpolate_pos_encoding": True} if model_type == "vit" else {}
    with torch.no_grad():
        expected_hidden = backbone(torch.from_numpy(pixels), **kwargs).last_hidden_state.numpy()
    logit_diff = np.abs(np.asarray(logits) - expected).max()
    hidden_diff = np.abs(np.asarray(hidden) - expected_hidden).max()
    print(f"{model_type} {size}: max |diff| logits {logit_diff:.2e}, hidden {hidden_diff:.2e}")
    assert logits.dtype == jnp.float32 and logits.shape == (2, 3)
    assert hidden.shape == expected_hidden.shape
    assert logit_diff < 1e-4 and hidden_diff < 1e-4


@pytest.mark.parametrize("model_type", ["vit", "dinov2"])
def test_bare_backbone_checkpoint_loads(model_type, tmp_path):
    """A ViTModel / Dinov2Model directory (no `vit.` / `dinov2.` prefix, a pooler or a mask
    token no classifier uses) loads into the backbone; the head comes from init."""
    model = _hf_model(model_type, bare=True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    family = models.family_for(model_type)
    assert family is FAMILIES[model_type]
    config, module, params = loading.load_pretrained(
        family, str(tmp_path), "image_classification", num_labels=5
    )
    pixels = _pixels(42, 35)
    hidden = jax.jit(vit.ViTModel(config).apply)({"params": params[model_type]}, _nhwc(pixels))
    expected = _hf_forward(model, pixels).last_hidden_state.numpy()
    assert np.abs(np.asarray(hidden) - expected).max() < 1e-4
    features = 2 * 32 if model_type == "dinov2" else 32
    assert params["classifier"]["kernel"].shape == (features, 5)  # new, from the init
    assert np.abs(params["classifier"]["kernel"]).max() > 0


# One layer: these tests compile the model, which takes seconds per layer on a loaded CPU.
TINY = {
    t: vit_config.ViTConfig(
        model_type=t,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=32,
        image_size=28,
        patch_size=7,
        num_labels=3,
        layerscale_value=0.5 if t == "dinov2" else None,
    )
    for t in ("vit", "dinov2")
}


@functools.cache
def _tiny_params(model_type: str):
    """TINY's init params, computed once per module (compiling the init takes seconds)."""
    return nn.meta.unbox(vit.init_params(TINY[model_type], jax.random.PRNGKey(0)))


def _flat_shapes(config):
    shapes = jax.eval_shape(functools.partial(vit.init_params, config), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(
        shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("model_type", ["vit", "dinov2"])
def test_every_param_has_logical_names_and_an_hf_tensor(model_type):
    config = dataclasses.replace(TINY[model_type], num_hidden_layers=2)
    flat = _flat_shapes(config)
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)
    per_layer = 16 if model_type == "vit" else 18  # + LayerScale's two lambdas
    assert len(flat) == 4 + per_layer * config.num_hidden_layers + 2 + 2
    assert flat[f"{model_type}/embeddings/patch_embeddings/kernel"].value.shape == (147, 16)
    assert flat[f"{model_type}/embeddings/position_embeddings"].value.shape == (17, 16)
    assert flat[f"{model_type}/encoder/layer_1/attention/query/kernel"].value.shape == (16, 4, 4)
    features = 32 if model_type == "dinov2" else 16  # [CLS, patch mean] or CLS
    assert flat["classifier/kernel"].value.shape == (features, 3)
    rows = {m.path: m for m in FAMILIES[model_type].hf_param_mappings(config)}
    assert set(rows) == set(flat)
    for path, m in rows.items():
        assert m.shape == flat[path].value.shape, path


@pytest.mark.parametrize("model_type", ["vit", "dinov2"])
def test_to_hf_from_hf_round_trip(model_type, tmp_path):
    model = _hf_model(model_type, bare=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    hf = model_files.read_safetensors(tmp_path)
    family = FAMILIES[model_type]
    config = family.config_from_hf(model_files.read_hf_config(tmp_path))
    params, missing = hf_mapping.params_from_hf(hf, family, config)
    assert missing == []
    params["classifier"] = {"kernel": hf["classifier.weight"].T, "bias": hf["classifier.bias"]}
    back = hf_mapping.params_to_hf(params, family, config)
    # DINOv2's mask token only serves masked-image pretraining: no param of ours holds it,
    # and the export writes HF's init (zeros) so transformers loads it with nothing missing.
    assert set(back) == set(hf)
    for key, value in hf.items():
        want = np.zeros_like(value) if key.endswith("mask_token") else value
        np.testing.assert_array_equal(back[key], want, err_msg=key)


def test_scan_layers_loads_and_computes_like_unrolled(tiny_classifier):
    model_type, _, model_dir = tiny_classifier
    _, module, params = _load_with_hf_head(model_type, model_dir)
    _, scanned_module, scanned = _load_with_hf_head(model_type, model_dir, scan_layers=True)
    stacked = scanned[model_type]["encoder"]["layer"]["mlp"]["fc1"]["kernel"]
    assert stacked.shape == (2, 32, 64)
    np.testing.assert_array_equal(
        stacked[1], params[model_type]["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"]
    )
    pixels = _nhwc(_pixels(42, 35))
    np.testing.assert_allclose(
        scanned_module.apply({"params": scanned}, pixels),
        module.apply({"params": params}, pixels),
        atol=1e-5,
    )


LORA_ALL = r".*/(attention/(query|key|value|output)|mlp/fc[12])/kernel"


@pytest.mark.parametrize("targets", [lora_lib.LoraConfig(rank=1).targets, LORA_ALL])
def test_lora_attaches_to_projections_and_merges(targets):
    config = dataclasses.replace(TINY["dinov2"], lora=lora_lib.LoraConfig(rank=2, targets=targets))
    params = nn.meta.unbox(vit.init_params(config, jax.random.PRNGKey(0)))
    paths = lora_lib.adapter_paths(lora_lib.flat_paths(params))
    per_layer = 4 if targets != LORA_ALL else 12  # a, b on query + value, or on all six
    assert len(paths) == per_layer * config.num_hidden_layers
    flat = lora_lib.flat_paths(params)
    for path in [p for p in flat if p.endswith("lora_b")]:
        flat[path] = np.full(np.shape(flat[path]), 0.05, np.float32)  # a trained-looking B
    params = lora_lib.nested(flat)
    pixels = _nhwc(_pixels(28, 28))
    with_lora = jax.jit(vit.ViTForImageClassification(config).apply)({"params": params}, pixels)
    plain = dataclasses.replace(config, lora=None)
    merged = lora_lib.merge(params, config.lora)
    without = jax.jit(vit.ViTForImageClassification(plain).apply)({"params": merged}, pixels)
    np.testing.assert_allclose(with_lora, without, atol=1e-5)


def test_dropout_and_drop_path_use_rng_only_when_not_deterministic():
    config = dataclasses.replace(
        TINY["dinov2"],
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.2,
        drop_path_rate=0.3,
    )
    params = _tiny_params("dinov2")  # dropout rates do not change the params
    module = vit.ViTForImageClassification(config)
    pixels = _nhwc(_pixels(28, 28, batch=4))

    @functools.partial(jax.jit, static_argnums=1)
    def run(seed, deterministic):
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return module.apply({"params": params}, pixels, deterministic=deterministic, rngs=rngs)

    assert not np.allclose(run(1, False), run(2, False))
    np.testing.assert_array_equal(run(1, True), run(2, True))


def test_config_from_hf():
    dinov2 = vit_config.ViTConfig.from_hf(
        {
            "model_type": "dinov2",
            "hidden_size": 384,
            "num_attention_heads": 6,
            "mlp_ratio": 4,
            "image_size": 518,
            "patch_size": 14,
            "dtype": "bfloat16",
            "id2label": {"0": "a", "1": "b"},
        },
        remat="full",
    )
    assert (dinov2.intermediate_size, dinov2.layer_norm_eps, dinov2.layerscale_value) == (
        1536,
        1e-6,
        1.0,
    )
    assert (dinov2.grid_size, dinov2.num_labels, dinov2.dtype, dinov2.remat) == (
        37,
        2,
        "float32",
        "full",
    )
    plain = vit_config.ViTConfig.from_hf({"model_type": "vit", "image_size": [32, 32]})
    assert (plain.layer_norm_eps, plain.layerscale_value, plain.image_size) == (1e-12, None, 32)
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        vit_config.ViTConfig.from_hf({"model_type": "dinov2", "use_swiglu_ffn": True})
    with pytest.raises(ValueError, match="not square"):
        vit_config.ViTConfig.from_hf({"model_type": "vit", "image_size": [32, 48]})


def test_channels_first_input_is_an_error_naming_the_layout():
    module = vit.ViTForImageClassification(TINY["vit"])
    with pytest.raises(ValueError, match=r"NHWC expected"):
        module.init(jax.random.PRNGKey(0), _pixels(28, 28))  # [B, C, H, W]


def test_default_sharding_rules_cover_every_logical_name():
    """Every logical axis the params use has a rule (unknown names are an error at build)."""
    boxed = jax.eval_shape(
        functools.partial(vit.init_params, TINY["dinov2"]), jax.random.PRNGKey(0)
    )
    mesh = sharding.make_mesh(base_config().mesh, jax.devices()[:1])
    shardings = sharding.param_shardings(boxed, mesh, list(base_config().sharding.rules))
    assert len(jax.tree.leaves(shardings)) == len(_flat_shapes(TINY["dinov2"]))


def test_remat_and_bfloat16_variants():
    """Remat gives the same logits; bf16 compute stays close with float32 logits and grads."""
    config, params = TINY["dinov2"], _tiny_params("dinov2")
    pixels = _nhwc(_pixels(28, 28))
    base = jax.jit(vit.ViTForImageClassification(config).apply)({"params": params}, pixels)
    for overrides, atol in (({"remat": "full"}, 1e-6), ({"dtype": "bfloat16"}, 5e-2)):
        module = vit.ViTForImageClassification(dataclasses.replace(config, **overrides))

        def loss(p, module=module):
            logits = module.apply({"params": p}, pixels)
            return logits.sum(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        assert logits.dtype == jnp.float32, overrides
        np.testing.assert_allclose(logits, base, atol=atol, err_msg=str(overrides))
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
