"""LoRA's maths, and the adapter config and param trees of every PEFT method.

A LoRA layer computes `x @ W + scale * ((x @ A) @ B)` with W frozen, A [*in, r] and B
[r, *out] trainable, and `scale = alpha / rank`. The update is never merged into W before the
matmul: `(W + A @ B)` would make autodiff form the full dL/dW, which is exactly the work LoRA
exists to avoid. `layers.DenseND` holds the params next to its kernel (`<layer>/lora_a`,
`<layer>/lora_b`), so every rule over '/'-joined paths (freezing, sharding, decay) sees them.

`LoraConfig` is the adapter config of every `peft.method` (named for the first one): LoRA,
DoRA (`dora.py`: LoRA plus `<layer>/lora_magnitude`), IA3 (`ia3.py`: `<layer>/ia3_scale` or
`ia3_input_scale`) and prompt tuning (`prompt_tuning.py`: `prompt_embeddings`). The param-tree
helpers here (`is_adapter_path`, `adapter_params`, `merge`) cover all of them.

Adapter files (our safetensors, HF PEFT) are written and read by `finetune_jax.hf.adapters`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from finetune_jax import tree_paths
from finetune_jax.models import dora, ia3, quantization, quantized_kernels
from finetune_jax.models.prompt_tuning import PROMPT_EMBEDDINGS

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_MAGNITUDE = "lora_magnitude"  # DoRA's magnitude vector m [*out]
RANK_AXIS = "lora_rank"  # logical axis name of the rank dimension (replicated by default)
# `peft.method` values, and the param leaves each adds next to (or instead of) the kernels.
METHOD_LEAVES = {
    "lora": (LORA_A, LORA_B),
    "dora": (LORA_A, LORA_B, LORA_MAGNITUDE),
    "ia3": (ia3.SCALE, ia3.INPUT_SCALE),
    "prompt": (PROMPT_EMBEDDINGS,),
}
LOW_RANK = ("lora", "dora")  # the methods that read rank, alpha and dropout
ADAPTER_LEAVES = tuple(dict.fromkeys(leaf for ls in METHOD_LEAVES.values() for leaf in ls))
# Adapter leaves whose start values are functions of the pretrained weights (loading computes
# them once the weights are in: `dora_magnitudes`, `prompt_tuning.initial_values`).
DERIVED_LEAVES = (LORA_MAGNITUDE, PROMPT_EMBEDDINGS)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter hyper-parameters of any `peft.method`. Frozen and hashable: it sits in model
    configs (jit statics).

    `targets` is a regex that must full-match a kernel's '/'-joined param path (the same
    path string the optimizer rules see), e.g. r".*/attention/(query|value)/kernel".
    In a scanned model (`scan_layers`) the kernels of the layer stack are matched on their
    per-layer paths (`model/layers_3/...`), as in the unrolled layout.
    `method`: lora | dora (rank, alpha, dropout, targets) | ia3 (targets; `feedforward`: the
    targets whose input rather than output is scaled) | prompt (`num_virtual_tokens`; no
    targets). `rank` is 0 for the methods without one.
    """

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r".*/attention/(query|value)/kernel"
    method: str = "lora"
    feedforward: str = ""  # ia3: regex of the targets scaled on their input
    num_virtual_tokens: int = 0  # prompt: trained embeddings prepended to the input
    # QLoRA: the frozen kernels `quantize_targets` matches stored quantized (nf4 | int8 |
    # q4_1; "none": float), dequantized inside their layer (`quantized_kernels.py`).
    quantize: str = "none"
    quantize_targets: str = ""
    # Set by models that scan their layers (`for_layer_stack`), not by users: (stack path,
    # layer count) pairs whose stacked kernels are matched on their per-layer paths.
    layer_stacks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHOD_LEAVES:
            raise ValueError(f"PEFT method {self.method!r} is not one of {list(METHOD_LEAVES)}")
        if self.method in LOW_RANK and self.rank < 1:
            raise ValueError(
                f"{self.method} rank must be >= 1, got {self.rank} (rank 0 means no LoRA)"
            )
        if self.method == "prompt" and self.num_virtual_tokens < 1:
            raise ValueError(
                f"prompt tuning needs num_virtual_tokens >= 1, got {self.num_virtual_tokens}"
            )
        if self.quantize not in quantization.METHODS:
            raise ValueError(
                f"peft.quantize {self.quantize!r} is not one of {list(quantization.METHODS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        for name in ("targets", "feedforward", "quantize_targets"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ValueError(
                    f"peft.{name} {getattr(self, name)!r} is not a valid regex: {e}"
                ) from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def leaves(self) -> tuple[str, ...]:
        """The param leaf names this method adds."""
        return METHOD_LEAVES[self.method]

    def matches(self, kernel_path: str) -> bool:
        """Whether the kernel at this '/'-joined param path is adapted (never, for prompt
        tuning, which adapts no kernel).

        A stacked kernel is adapted when `targets` matches every one of its per-layer paths;
        matching only some is an error: a stacked adapter covers all layers or none.
        """
        return self.method != "prompt" and self._matches("targets", kernel_path)

    def scales_input(self, kernel_path: str) -> bool:
        """Whether IA3 scales this (adapted) kernel's input: `feedforward` matches it."""
        return self.method == "ia3" and self._matches("feedforward", kernel_path)

    def quantizes(self, kernel_path: str) -> bool:
        """Whether the frozen kernel at this path is stored quantized (`quantize_targets`
        matches it; a stacked kernel's layers all or none, as for `targets`)."""
        return self.quantize != "none" and self._matches("quantize_targets", kernel_path)

    def _matches(self, key: str, kernel_path: str) -> bool:
        regex = getattr(self, key)
        paths = tree_paths.virtual_paths(kernel_path, dict(self.layer_stacks))
        hits = [re.fullmatch(regex, p) is not None for p in paths]
        if any(hits) and not all(hits):
            raise ValueError(
                f"peft.{key}={regex!r} matches {sum(hits)} of the {len(hits)} layers "
                f"of the stacked kernel {kernel_path!r}; with model.scan_layers=True an adapter "
                "covers every layer of the stack (use model.scan_layers=False for per-layer ones)"
            )
        return hits[0]

    @classmethod
    def from_config(cls, peft: Mapping[str, Any]) -> LoraConfig | None:
        """`config.peft` -> LoraConfig, or None for LoRA at `peft.rank` 0 (PEFT off).

        Keys a method does not read keep neutral values (rank 0 and the default alpha for
        ia3 and prompt, no targets for prompt); `builder.lora_config` refuses the ones
        that would be silently ignored."""
        method = str(peft["method"])
        if method == "lora" and int(peft["rank"]) == 0:
            return None
        low_rank = method in LOW_RANK
        return cls(
            rank=int(peft["rank"]) if low_rank else 0,
            alpha=float(peft["alpha"]) if low_rank else 16.0,
            dropout=float(peft["dropout"]),
            targets="" if method == "prompt" else str(peft["targets"]),
            method=method,
            feedforward=str(peft["feedforward"]) if method == "ia3" else "",
            num_virtual_tokens=int(peft["num_virtual_tokens"]) if method == "prompt" else 0,
            quantize=str(peft["quantize"]),
            quantize_targets="" if peft["quantize"] == "none" else str(peft["quantize_targets"]),
        )


def for_layer_stack(config: Any, stack: str) -> Any:
    """`config` (a model config with `lora` and `num_hidden_layers`) as seen by the layers
    of the scanned stack at `stack`: LoRA targets then match their per-layer paths."""
    if config.lora is None:
        return config
    lora = dataclasses.replace(config.lora, layer_stacks=((stack, config.num_hidden_layers),))
    return dataclasses.replace(config, lora=lora)


def _rank_first(h: jax.Array) -> jax.Array:
    """[..., r] -> [r, ...], materialised: an optimization barrier keeps XLA from folding
    the transpose into the dot that reads it, where XLA:CPU would instead transpose the
    dot's other, token-sized operand (in the producing fusion, with strided writes)."""
    return jax.lax.optimization_barrier(jnp.moveaxis(h, -1, 0))


def _contract_tokens(rank_first: jax.Array, y: jax.Array, lead: int) -> jax.Array:
    """[r, *lead] x [*lead, ...] -> [r, ...]: a sum over the token dims."""
    dims = tuple(range(lead))
    return jax.lax.dot_general(rank_first, y, ((tuple(d + 1 for d in dims), dims), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, in_axes: int) -> jax.Array:
    """`scale * ((x @ a) @ b)` contracting the last `in_axes` dims of x with a's leading ones.

    The scale multiplies the rank-r intermediate: r values per token instead of |out|. The
    backward pass is written out (same maths as autodiff's) so that the adapters' gradients,
    sums over tokens, read their rank-sized operand transposed rather than the token-sized
    one: autodiff's form cost a LoRA SFT step on XLA:CPU 12% of its time in one strided
    transpose of the MLP's gradient (tools/profile_step.py --trace).
    """
    return _lora_forward(x, a, b, scale, in_axes)[0]


def _lora_forward(x, a, b, scale, in_axes):
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    h = jax.lax.dot_general(x, a, (contract, ((), ()))) * jnp.asarray(scale, x.dtype)
    return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ()))), (x, a, b, h)


def _lora_backward(scale, in_axes, residuals, dy):
    x, a, b, h = residuals
    lead = x.ndim - in_axes  # token dims
    out_dims = tuple(range(lead, dy.ndim))
    # d(x @ a) = scale * dy @ b^T, [..., r]
    dh = jax.lax.dot_general(dy, b, ((out_dims, tuple(range(1, b.ndim))), ((), ())))
    dh = dh * jnp.asarray(scale, dh.dtype)
    db = _contract_tokens(_rank_first(h), dy, lead)  # h^T @ dy: [r, *out]
    da = jnp.moveaxis(_contract_tokens(_rank_first(dh), x, lead), 0, -1)  # x^T @ dh: [*in, r]
    dx = jax.lax.dot_general(dh, a, (((dh.ndim - 1,), (a.ndim - 1,)), ((), ())))
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_forward, _lora_backward)


def named_like_kernel(
    kernel_init: Callable,
    kernel_shape: tuple[int, ...],
    value: Callable[[jax.Array, tuple[int, ...], Any], jax.Array],
    names: Callable[[tuple], tuple],
) -> Callable:
    """An initialiser of an adapter param: `value(rng, shape, dtype)`, boxed with the
    logical names `names(kernel's names)` when the kernel carries names, so the param is
    sharded by the rules that shard its base weight. Names are looked up lazily (inside the
    initialiser), so applying an initialised model costs nothing extra."""

    def init(rng: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        boxed = jax.eval_shape(
            lambda: kernel_init(jax.random.PRNGKey(0), kernel_shape, jnp.float32)
        )
        base = getattr(boxed, "names", None)
        out = value(rng, shape, dtype)
        return out if base is None else nn.LogicallyPartitioned(out, names(base))

    return init


def lora_initializers(
    kernel_init: Callable, kernel_shape: tuple[int, ...], in_axes: int
) -> tuple[Callable, Callable]:
    """Initialisers for A and B, carrying logical names derived from the kernel's.

    A gets (in-dims' names, "lora_rank") and B ("lora_rank", out-dims' names). A is HF
    PEFT's default init (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in))); B is zero, so a fresh adapter leaves the model's outputs unchanged.
    """

    def value_a(rng: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    def value_b(rng: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jnp.zeros(shape, dtype)

    return (
        named_like_kernel(
            kernel_init, kernel_shape, value_a, lambda base: (*base[:in_axes], RANK_AXIS)
        ),
        named_like_kernel(
            kernel_init, kernel_shape, value_b, lambda base: (RANK_AXIS, *base[in_axes:])
        ),
    )


# ----------------------------------------------------------------------------- param trees


def is_adapter_path(path: str) -> bool:
    """Whether a '/'-joined param path names an adapter leaf of any PEFT method."""
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def flat_paths(params: Mapping[str, Any]) -> dict[str, Any]:
    """A nested param dict as {'/'-joined path: leaf}."""
    return traverse_util.flatten_dict(params, sep="/")


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flat_paths`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def adapter_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Only the adapter leaves of `params`, as a nested dict."""
    return nested({p: v for p, v in flat_paths(params).items() if is_adapter_path(p)})


def merge(params: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """The adapters folded into the kernels (adapter leaves removed, quantized kernels
    dequantized first: as HF PEFT merges into a bitsandbytes 4-bit base): LoRA's W + s A B,
    DoRA's m (W + s A B) / ||W + s A B||, IA3's diagonal scale of W (and of the bias, for an
    output scale). Prompt tuning has no kernel to fold into: a ValueError.

    The result loads into the same model built without an adapter. Products are taken at
    full float32 precision (TPUs default to bf16 passes for matmuls). Stacked leaves (a
    leading layer axis on kernel and adapter) are merged layer by layer.
    """
    if lora.method == "prompt":
        raise ValueError(
            "peft.method=prompt cannot be merged into the base weights: its virtual tokens "
            "are an input, not a change to a kernel; export the adapter alone (HF PEFT format)"
        )
    flat = quantized_kernels.dequantized(flat_paths(params))
    merged = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    for path in flat:
        layer, _, leaf = path.rpartition("/")
        kernel_path = layer + "/kernel"
        if leaf == LORA_A:
            kernel, delta, stacked = _low_rank_delta(flat, layer, lora.scale)
            if LORA_MAGNITUDE in lora.leaves:
                folded = dora.fold(kernel, delta, flat[layer + "/" + LORA_MAGNITUDE], stacked)
            else:
                folded = kernel + delta
            merged[kernel_path] = folded.astype(kernel.dtype)
        elif leaf in (ia3.SCALE, ia3.INPUT_SCALE):
            kernel, bias = flat[kernel_path], flat.get(layer + "/bias")
            folded, folded_bias = ia3.fold(kernel, bias, flat[path], leaf == ia3.INPUT_SCALE)
            merged[kernel_path] = folded.astype(kernel.dtype)
            if bias is not None:
                merged[layer + "/bias"] = folded_bias.astype(bias.dtype)
    return nested(merged)


def _low_rank_delta(flat: Mapping[str, Any], layer: str, scale: float) -> tuple:
    """(kernel, scale * A @ B at the kernel's shape, whether the leaves are stacked)."""
    product = functools.partial(jnp.tensordot, axes=1, precision=jax.lax.Precision.HIGHEST)
    kernel, a, b = (flat[f"{layer}/{leaf}"] for leaf in ("kernel", LORA_A, LORA_B))
    # A [*in, r] @ B [r, *out] has the kernel's rank; stacked, all three have one more dim.
    stacked = kernel.ndim == a.ndim + b.ndim - 3
    delta = jax.vmap(product)(a, b) if stacked else product(a, b)
    return kernel, scale * delta, stacked


def dora_magnitudes(
    flat: Mapping[str, Any], scale: float, magnitudes: Mapping[str, Any]
) -> dict[str, jax.Array]:
    """{path: ||W + scale A B||} for the DoRA magnitude leaves `magnitudes` (path -> shape
    and dtype) from the kernels and A, B in `flat`: the value a layer starts from (||W||
    while B is zero), computed once the kernels are loaded."""
    out, flat = {}, quantized_kernels.dequantized(flat)
    for path, magnitude in magnitudes.items():
        kernel, delta, stacked = _low_rank_delta(flat, path.rpartition("/")[0], scale)
        in_axes = kernel.ndim - len(magnitude.shape)
        norm = dora.weight_norm(kernel, delta, in_axes, first=int(stacked))
        out[path] = norm.astype(magnitude.dtype)
    return out


def adapter_paths(paths: Iterable[str]) -> list[str]:
    """The adapter leaves among a model's param paths (built with an adapter config).

    None at all means the `targets` regex matched no kernel: an error rather than a silent
    full freeze.
    """
    paths = list(paths)
    found = [p for p in paths if is_adapter_path(p)]
    if not found:
        kernels = [p for p in paths if p.endswith("/kernel")]
        raise ValueError(
            f"peft.targets matches no kernel of this model; kernel paths look like {kernels[:4]}"
        )
    return found
