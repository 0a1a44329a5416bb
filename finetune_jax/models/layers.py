"""Layers shared by the model files: activations, remat policies, RMSNorm, and `DenseND`
(the projection LoRA attaches to). Everything here is architecture-neutral."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import dora, ia3, quantized_kernels
from finetune_jax.models.lora import (
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    LoraConfig,
    for_layer_stack,
    lora_delta,
    lora_initializers,
    named_like_kernel,
)

# HF `hidden_act` names -> functions. HF's "gelu" is the exact erf form; the tanh
# approximation goes by several names across checkpoints.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def normal_init(stddev: float, names: tuple[str | None, ...]):
    """N(0, stddev) init with the param's logical axis names attached."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def zeros_init(names: tuple[str | None, ...]):
    """Zeros init with the param's logical axis names attached."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(config: Any, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over `embed` with `config`'s layer_norm_eps, dtype and param_dtype."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        # Two-pass variance: the fast E[x^2]-E[x]^2 form costs ~1e-5 of parity with torch.
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=zeros_init(("embed",)),
        name=name,
    )


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function for an HF `hidden_act` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module_cls, policy: str, static_argnums: tuple[int, ...] = (), scanned: bool = False):
    """`module_cls` wrapped in `nn.remat` with a named policy; 'none' returns it unchanged.

    'full' keeps only the block's inputs for the backward pass; 'dots_saveable' also keeps
    the results of weight matmuls, recomputing only cheap elementwise work. Inside a scan
    (`scanned`) the loop already keeps XLA from merging the recomputation into the forward
    pass, so remat's own CSE barriers are left out (they cost speed there).
    """
    if policy in ("none", "", None, False):
        return module_cls
    if policy is True:  # older configs said remat=True
        policy = "full"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r} is not one of none, {', '.join(REMAT_POLICIES)}")
    return nn.remat(
        module_cls,
        policy=REMAT_POLICIES[policy],
        static_argnums=static_argnums,
        prevent_cse=not scanned,
    )


# Logical axis name of the leading layer axis of stacked (scanned) params.
LAYER_AXIS = "layers"


def scan_layers(body: Callable, length: int) -> Callable:
    """`body(layer, carry, xs) -> (carry, ys)` run over `length` layers by `nn.scan`.

    The returned function takes (layer module, carry, xs). The layer's params are created
    and read stacked along a leading axis named LAYER_AXIS (one program whatever the
    depth); xs / ys are sliced / stacked along their leading axis; every layer draws its own
    init and dropout randomness.
    """
    return nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=length,
        metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
    )


def encoder_stack(
    scope_path: tuple[str, ...],
    layer_cls: type,
    config: Any,
    x: Any,
    *args,
    last_layer: dict[str, Any] | None = None,
    collect: int = 0,
):
    """`x` through `config.num_hidden_layers` blocks `layer_cls(config)(x, *args)`, built
    inside the calling encoder's compact `__call__` (`scope_path`: its `self.scope.path`).

    The last of `args` must be `deterministic` (a Python bool, static under remat). Unrolled,
    the blocks are `layer_{i}`; with `config.scan_layers`, one `layer` block under `nn.scan`
    with its params stacked along a leading layer axis; `config.remat` applies to both.
    `last_layer`: extra fields of the last block (unrolled only: scanned blocks are alike).
    `collect` > 0 returns `(x, outputs)` instead: the last `collect` blocks' outputs stacked
    along a new leading axis, oldest first (heads that read several layers).
    """
    # static_argnums counts `self` as 0 and `x` as 1: `deterministic` is 1 + len(args).
    block = remat(
        layer_cls, config.remat, static_argnums=(1 + len(args),), scanned=config.scan_layers
    )
    if config.scan_layers:
        layer = block(for_layer_stack(config, "/".join((*scope_path, "layer"))), name="layer")

        def body(layer, x, _):
            y = layer(x, *args)
            return y, (y if collect else None)

        x, outputs = scan_layers(body, config.num_hidden_layers)(layer, x, None)
        return (x, outputs[-collect:]) if collect else x
    last = config.num_hidden_layers - 1
    outputs = []
    for i in range(config.num_hidden_layers):
        fields = last_layer if last_layer and i == last else {}
        x = block(config, name=f"layer_{i}", **fields)(x, *args)
        outputs.append(x)
    return (x, jnp.stack(outputs[-collect:])) if collect else x


# ----------------------------------------------------------------------------- Dropout

# Keep decisions come from 16-bit draws: half the random bits of `nn.Dropout`'s float32
# uniforms. Threefry (sharding-invariant, "partitionable") computes one 2x32-bit block per
# 32-bit output, and 32-bit mask draws cost 6% of a MiniLM train step on CPU; each 32-bit
# draw here decides two elements. The keep probability is rounded to a multiple of 2^-16 and
# the kept values are scaled by its exact inverse, so the layer stays unbiased.
_DRAW_LEVELS = 1 << 16


def _keep_threshold(keep_prob: float) -> int:
    """A 16-bit draw below this keeps its element: probability threshold / 2^16."""
    return round(keep_prob * _DRAW_LEVELS)


def keep_mask(rng: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    """Boolean mask of `shape`, True with probability round(keep_prob * 2^16) / 2^16."""
    if not shape:  # a scalar: one draw, the same rounded probability
        return keep_mask(rng, (1,), keep_prob).reshape(())
    pairs = -(-shape[-1] // 2)
    words = jax.random.bits(rng, (*shape[:-1], pairs), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1)
    draws = halves.reshape(*shape[:-1], 2 * pairs)[..., : shape[-1]]
    return draws < _keep_threshold(keep_prob)


class Dropout(nn.Module):
    """`nn.Dropout` (same fields and call) drawing its mask with `keep_mask`."""

    rate: float
    broadcast_dims: tuple[int, ...] = ()
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # no 0 / 0 in the gradient
            return jnp.zeros_like(inputs)
        shape = [1 if d in self.broadcast_dims else n for d, n in enumerate(inputs.shape)]
        keep = keep_mask(self.make_rng(self.rng_collection), tuple(shape), 1.0 - self.rate)
        kept = _keep_threshold(1.0 - self.rate) / _DRAW_LEVELS
        mask = jnp.broadcast_to(keep, inputs.shape)
        return jax.lax.select(
            mask, inputs / jnp.asarray(kept, inputs.dtype), jnp.zeros_like(inputs)
        )


# ----------------------------------------------------------------------------- RMSNorm, RoPE


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (no centring, no bias), as in HF's LlamaRMSNorm.

    Statistics are taken in float32 whatever the compute dtype; the normalised value is cast
    to `dtype` before the scale (stored in `param_dtype`) multiplies it, which is HF's order of casts.
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32  # storage dtype of the scale

    @nn.compact
    def __call__(self, x_BLD):
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (x_BLD.shape[-1],),
            self.param_dtype,
        )
        x32_BLD = x_BLD.astype(jnp.float32)
        variance_BL1 = jnp.mean(jnp.square(x32_BLD), axis=-1, keepdims=True)
        normed_BLD = (x32_BLD * jax.lax.rsqrt(variance_BL1 + self.epsilon)).astype(self.dtype)
        return scale_D.astype(self.dtype) * normed_BLD


# HF `rope_type`s that `rope_inverse_frequencies` implements (transformers' modeling_rope_utils).


class DenseND(nn.Module):
    """`x[..., *in] @ kernel[*in, *features] (+ bias[*features])`, params at their full shape.

    Like `nn.DenseGeneral`, but the kernel is initialised at its multi-dimensional shape:
    DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks logical
    partitioning names (one per real dimension) as soon as a mesh is active.
    `kernel_init` / `bias_init` carry their logical names (`nn.with_logical_partitioning`);
    `bias_init=None` means no bias. `out_dtype` sets the matmul's result (accumulation)
    dtype, e.g. float32 logits from bf16 inputs; None means the compute dtype.

    With `lora` set and its `targets` full-matching this layer's kernel path, the layer is
    adapted by `lora.method`: LoRA adds `scale * ((dropout(x) @ lora_a) @ lora_b)` (see
    `lora.py`), DoRA rescales that sum per output feature (`dora.py`), IA3 scales the
    output or, for `feedforward` kernels, the input (`ia3.py`). The frozen kernel's matmul
    is always kept separate, so no gradient with respect to it is ever formed. A kernel that
    `lora.quantize_targets` matches is stored quantized (`quantized_kernels.py`: QLoRA's
    base) and dequantized to `dtype` inside the call. Adapter
    params are created after kernel and bias, so adding one leaves every other param's init
    draw unchanged.
    """

    features: tuple[int, ...]
    kernel_init: Callable
    bias_init: Callable | None = None
    in_axes: int = 1  # how many trailing dims of x are contracted
    dtype: Any = jnp.float32
    out_dtype: Any = None
    param_dtype: Any = jnp.float32  # storage dtype of kernel, bias and adapter params
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_axes :]
        kernel_shape = (*in_shape, *self.features)
        # The path the optimizer and sharding rules see for this kernel (a shared scope,
        # as in BertOutput, makes it the parent's path).
        path = "/".join(self.scope.path) + "/kernel"
        if self.lora is not None and self.lora.quantizes(path):  # QLoRA's frozen base
            kernel = quantized_kernels.create(
                self, self.lora.quantize, self.kernel_init, kernel_shape, self.in_axes,
                self.param_dtype,
            )  # fmt: skip
        else:
            kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = None
        if self.bias_init is not None:
            bias = self.param("bias", self.bias_init, self.features, self.param_dtype)
        x = x.astype(self.dtype)
        adapter = self.lora if self.lora is not None and self.lora.matches(path) else None
        if adapter is not None and adapter.method == "ia3":
            return self._ia3(x, kernel, bias, adapter.scales_input(path))
        y = self._project(x, kernel)
        if adapter is not None and adapter.method == "dora":
            return self._dora(x, y, kernel, bias, deterministic)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        if adapter is not None:
            a, b = self._low_rank_params(kernel_shape)
            y = y + self._lora_update(self._lora_dropout(x, deterministic), a, b)
        return y

    def _project(self, x: jax.Array, kernel: Any) -> jax.Array:
        """x @ kernel over the last `in_axes` dims of x, no bias (a quantized kernel
        dequantized on the fly)."""
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))

        def dot(x: jax.Array, w: jax.Array) -> jax.Array:
            return jax.lax.dot_general(
                x, w.astype(self.dtype), (contract, ((), ())), preferred_element_type=self.out_dtype
            )

        if isinstance(kernel, quantized_kernels.QuantizedKernel):
            return kernel.matmul(dot, x)
        return dot(x, kernel)

    def _low_rank_params(self, kernel_shape: tuple) -> tuple[jax.Array, jax.Array]:
        """LoRA's (and DoRA's) A [*in, r] and B [r, *out]."""
        rank = self.lora.rank
        init_a, init_b = lora_initializers(self.kernel_init, kernel_shape, self.in_axes)
        a = self.param(LORA_A, init_a, (*kernel_shape[: self.in_axes], rank), self.param_dtype)
        b = self.param(LORA_B, init_b, (rank, *kernel_shape[self.in_axes :]), self.param_dtype)
        return a, b

    def _lora_dropout(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.lora.dropout == 0:
            return x
        # Named: in a scope shared with the parent an auto-named Dropout_0 could clash.
        return Dropout(self.lora.dropout, name="lora_dropout")(x, deterministic=deterministic)

    def _lora_update(self, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """The low-rank term scale * (x @ A) @ B."""
        a, b = a.astype(self.dtype), b.astype(self.dtype)
        return lora_delta(x, a, b, self.lora.scale, self.in_axes)

    def _dora(self, x, y, kernel, bias, deterministic: bool) -> jax.Array:
        """DoRA: g * (x W + s (x A) B) + b with g = m / ||W + s A B|| (a constant to autodiff).

        Under dropout the base term is PEFT's too: x W + (g - 1) * drop(x) W + g * update.
        """
        a, b = self._low_rank_params(kernel.shape)
        weight = quantized_kernels.dense(kernel)
        init = named_like_kernel(
            self.kernel_init,
            kernel.shape,
            lambda rng, shape, dtype: dora.weight_norm(weight, None, self.in_axes).astype(dtype),
            lambda base: base[self.in_axes :],
        )
        magnitude = self.param(LORA_MAGNITUDE, init, self.features, self.param_dtype)
        g = dora.magnitude_scale(magnitude, weight, a, b, self.lora.scale, self.in_axes)
        g = g.astype(y.dtype)
        dropped = self._lora_dropout(x, deterministic)
        if dropped is x:
            y = g * (y + self._lora_update(x, a, b).astype(y.dtype))
        else:
            y = y + (g - 1) * self._project(dropped, kernel) + g * self._lora_update(dropped, a, b)
        return y if bias is None else y + bias.astype(self.dtype)

    def _ia3(self, x, kernel, bias, scales_input: bool) -> jax.Array:
        """IA3: (x * l) W + b on feed-forward kernels, (x W + b) * l on the others."""
        shape = ia3.scale_shape(kernel.shape, self.in_axes, scales_input)
        out_dims = kernel.ndim - self.in_axes
        init = named_like_kernel(
            self.kernel_init,
            kernel.shape,
            lambda rng, shape, dtype: jnp.ones(shape, dtype),
            lambda base: (
                (*base[: self.in_axes], *(None,) * out_dims)
                if scales_input
                else (*(None,) * self.in_axes, *base[self.in_axes :])
            ),
        )
        name = ia3.INPUT_SCALE if scales_input else ia3.SCALE
        scale = self.param(name, init, shape, self.param_dtype).astype(self.dtype)
        if scales_input:
            x = x * scale.reshape(kernel.shape[: self.in_axes])
        y = self._project(x, kernel)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y if scales_input else y * scale.reshape(self.features).astype(y.dtype)


def classifier(num_labels: int, param_dtype: Any, initializer_range: float) -> nn.Dense:
    """A task head's `classifier` Dense [features -> num_labels], computed in float32: the
    head is tiny, so logits never come out in bf16."""
    return nn.Dense(
        num_labels,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        kernel_init=normal_init(initializer_range, ("embed", "classes")),
        bias_init=zeros_init(("classes",)),
        name="classifier",
    )
