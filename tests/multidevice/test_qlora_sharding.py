"""QLoRA on 8 fake devices (fsdp=4 x tensor=2, scanned layers): the quantized leaves carry their
kernel's sharding, and the streamed, host-quantized params arrive in it, each layer's values
those of its checkpoint tensor quantized."""

import jax
import numpy as np
import pytest

from finetune_jax.hf import model_files
from finetune_jax.models import hf_mapping, quantization
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import builder
from tests.multidevice.test_big_models import sft_mesh_config

MESH = {"fsdp": 4, "tensor": 2}


def _specs(setup) -> dict[str, tuple]:
    flat = lora_lib.flat_paths(setup.abstract_params)
    return {path: tuple(leaf.sharding.spec) for path, leaf in flat.items()}


def _padded(spec: tuple, ndim: int) -> tuple:
    return (*spec, *(None,) * (ndim - len(spec)))


@pytest.mark.parametrize("method", ["nf4", "int8", "q4_1"])
def test_quantized_leaves_shard_like_their_kernels(tiny_chat_llama_dir, method):
    """The codes carry the kernel's partition spec; the per-feature or per-block statistics
    its output dims' (a blocks axis `<name>_blocks` is split like the input dim it was cut
    from where that divides); the stacked layers axis leads, replicated."""
    config = sft_mesh_config(tiny_chat_llama_dir, MESH, **{"model.scan_layers": True})
    hf_config = model_files.read_config(tiny_chat_llama_dir)
    float_setup = builder.build(config, hf_config=hf_config)
    kernels = _specs(float_setup)
    float_shapes = lora_lib.flat_paths(float_setup.abstract_params)
    config.peft.quantize = method
    setup = builder.build(config)
    specs, abstract = _specs(setup), lora_lib.flat_paths(setup.abstract_params)
    codes, scale = quantization.LEAVES[method][:2]
    checked = 0
    for path, spec in specs.items():
        layer, _, leaf = path.rpartition("/")
        if leaf not in (codes, scale):
            continue
        kernel = kernels[f"{layer}/kernel"]
        assert any(kernel), f"{layer}/kernel is not sharded at all: nothing to check"
        kernel_ndim = float_shapes[f"{layer}/kernel"].ndim - 1  # one layer's
        shapes = {n: abstract[f"{layer}/{n}"].shape[1:] for n in quantization.LEAVES[method]}
        out_dims = kernel_ndim - quantization.in_axes_of(method, shapes, kernel_ndim)
        kernel = _padded(kernel, kernel_ndim + 1)
        spec = _padded(spec, abstract[path].ndim)
        if leaf == codes:
            assert spec == kernel, path
        else:
            assert spec[-out_dims:] == kernel[-out_dims:], path
            # Q4_1 keeps the input dims before its last (o_proj's heads); a blocks axis is
            # split like the input dim it was cut from where it divides, or replicated.
            blocks = len(spec) - out_dims - 1
            kept = kernel[1:blocks] if method == "q4_1" else (None,) * (blocks - 1)
            assert spec[1:blocks] == kept, path
            cut_from = kernel[blocks] if method == "q4_1" else kernel[1]
            assert spec[blocks] in (None, cut_from if method != "int8" else None), path
        assert spec[0] is None  # the stacked layers axis
        checked += 1
    assert checked == 2 * 7  # codes and scales of q/k/v/o and gate/up/down
    if method != "nf4":
        return  # the streaming below is the same for every format
    params = lora_lib.flat_paths(setup.pretrained_params())
    _, tensors = model_files.open_tensors(setup.model_ref)
    for m in setup.family.hf_param_mappings(setup.model_config):
        layer = m.path.rpartition("/")[0]
        if not m.path.endswith("_proj/kernel"):
            continue
        kernel = hf_mapping.hf_to_param(m, tensors.get(m.hf_key), m.hf_key, m.path)
        shapes = {n: abstract[f"{layer}/{n}"].shape[1:] for n in quantization.LEAVES[method]}
        in_axes = quantization.in_axes_of(method, shapes, kernel.ndim)
        for name, value in quantization.quantize(method, kernel, in_axes).items():
            placed = params[f"{layer}/{name}"]
            assert placed.sharding.spec == abstract[f"{layer}/{name}"].sharding.spec
            np.testing.assert_array_equal(jax.device_get(placed)[m.layer], value)
