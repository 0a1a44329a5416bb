"""Quantized frozen kernels in layers and param trees (QLoRA): `layers.DenseND` stores the
kernels that `peft.quantize_targets` matches as the leaves of `quantization.py`'s formats
instead of a float `kernel`, and dequantizes them inside its call.

- The leaves sit next to where the kernel would (`<layer>/kernel_nf4`, ...), carry logical
  names derived from the kernel's (so they shard like it) and, in a scanned stack, the
  leading `layers` axis like every stacked param: the scan body dequantizes one layer's
  kernel at a time.
- The matmul on the dequantized kernel is rematerialised (`jax.checkpoint`): the backward
  pass dequantizes again instead of keeping a float copy of every layer's kernel alive from
  the forward pass. No gradient reaches the integer leaves: the train step differentiates the
  trainable leaves only, and a rule that would train one is an error (`training/optim.py`).
- A fresh (random) init draws the float kernel once with the kernel's initialiser and the
  kernel's place in the params rng sequence, then quantizes it: every other param draws what
  it draws in the float model. Pretrained weights are quantized on the host as they stream in
  (`hf/loading.py`); `dequantized` turns a param tree back into float kernels (merging,
  export, DoRA's starting magnitudes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import quantization


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A layer's quantized kernel: its method, leaves (one layer's) and float shape."""

    method: str
    leaves: Mapping[str, jax.Array]
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dense(self) -> jax.Array:
        """The dequantized float32 kernel."""
        return quantization.dequantize(self.method, self.leaves)

    def matmul(self, dot: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array) -> jax.Array:
        """`dot(x, kernel)` on the dequantized kernel, which the backward pass recomputes
        rather than keeps (remat saves only x and the integer leaves)."""

        def project(x, leaves):
            return dot(x, quantization.dequantize(self.method, leaves))

        policy = jax.checkpoint_policies.nothing_saveable
        return jax.checkpoint(project, policy=policy)(x, dict(self.leaves))


def dense(kernel: jax.Array | QuantizedKernel) -> jax.Array:
    """A float kernel as it is, a quantized one dequantized (float32)."""
    return kernel.dense() if isinstance(kernel, QuantizedKernel) else kernel


def create(
    module: nn.Module,
    method: str,
    kernel_init: Callable,
    shape: tuple[int, ...],
    in_axes: int,
    param_dtype: Any,
) -> QuantizedKernel:
    """The quantized kernel of `module` (inside its compact call): read, or at init drawn
    once from `kernel_init` at `param_dtype` (one draw of the params rng, as a float kernel
    takes) and quantized, its leaves boxed with names derived from the kernel's."""
    fresh: dict[str, Any] = {}

    def init(name: str) -> Any:
        if not fresh:
            boxed = kernel_init(module.make_rng("params"), shape, param_dtype)
            leaves = quantization.quantize(method, nn.meta.unbox(boxed), in_axes, xp=jnp)
            names = getattr(boxed, "names", None)
            axes = quantization.leaf_axes(method, names, in_axes) if names else {}
            for leaf, value in leaves.items():
                fresh[leaf] = nn.LogicallyPartitioned(value, axes[leaf]) if axes else value
        return fresh[name]

    leaves = {
        name: module.variable("params", name, init, name).value
        for name in quantization.LEAVES[method]
    }
    return QuantizedKernel(method, leaves, tuple(shape))


# ----------------------------------------------------------------------------- param trees


def method_of(layer: str, paths: Mapping[str, Any] | set[str]) -> str | None:
    """The quantization of the kernel of `layer` (a '/'-joined layer path) among `paths`
    (a flat param tree or its paths), or None for a float (or no) kernel."""
    for method, names in quantization.LEAVES.items():
        if f"{layer}/{names[0]}" in paths:
            return method
    return None


def quantized_layers(flat: Mapping[str, Any]) -> dict[str, str]:
    """{layer path: method} of the quantized kernels of a flat param tree."""
    codes = {names[0]: method for method, names in quantization.LEAVES.items()}
    layers = {}
    for path in flat:
        layer, _, leaf = path.rpartition("/")
        if leaf in codes:
            layers[layer] = codes[leaf]
    return layers


def is_quantized_path(path: str) -> bool:
    """Whether a '/'-joined param path names a quantized kernel's leaf."""
    return path.rsplit("/", 1)[-1] in quantization.LEAF_NAMES


def check_targets(lora: Any, paths: list[str]) -> None:
    """`peft.quantize` on (`lora`: the model's adapter config, or None) must find a kernel to
    quantize: none at all means `quantize_targets` matched nothing, an error rather than a
    silently float base."""
    if lora is None or lora.quantize == "none" or any(map(is_quantized_path, paths)):
        return
    kernels = [p for p in paths if p.endswith("/kernel")]
    raise ValueError(
        f"peft.quantize_targets={lora.quantize_targets!r} matches no kernel of this model; "
        f"kernel paths look like {kernels[:4]}"
    )


def leaves_of(flat: Mapping[str, Any], layer: str, method: str) -> dict[str, Any]:
    """{leaf name: value} of the quantized kernel of `layer`."""
    return {name: flat[f"{layer}/{name}"] for name in quantization.LEAVES[method]}


def layer_kernel(method: str, leaves: Mapping[str, Any]) -> jax.Array:
    """The float32 kernel of one layer's leaves, or of stacked ones (a leading layer axis:
    NF4's scalar mean then has one), layer by layer."""
    stacked = method == "nf4" and jnp.ndim(leaves[quantization.LEAVES["nf4"][3]]) == 1
    leaves = {name: jnp.asarray(value) for name, value in leaves.items()}
    if stacked:
        return jax.vmap(lambda ls: quantization.dequantize(method, ls))(leaves)
    return quantization.dequantize(method, leaves)


def dequantized(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat param tree with every quantized kernel's leaves replaced by its float32
    `kernel` (stacked ones layer by layer): what the float model built without
    `peft.quantize` loads."""
    layers = quantized_layers(flat)
    out = {p: v for p, v in flat.items() if not is_quantized_path(p)}
    for layer, method in layers.items():
        out[f"{layer}/kernel"] = layer_kernel(method, leaves_of(flat, layer, method))
    return out
