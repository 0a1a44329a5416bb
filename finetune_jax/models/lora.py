"""LoRA's maths: config, the low-rank update, initialisation, and merging into the kernels.

A LoRA layer computes `x @ W + scale * ((x @ A) @ B)` with W frozen, A [*in, r] and B
[r, *out] trainable, and `scale = alpha / rank`. The update is never merged into W before the
matmul: `(W + A @ B)` would make autodiff form the full dL/dW, which is exactly the work LoRA
exists to avoid. `layers.DenseND` holds the params next to its kernel (`<layer>/lora_a`,
`<layer>/lora_b`), so every rule over '/'-joined paths (freezing, sharding, decay) sees them.

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

LORA_A, LORA_B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"  # logical axis name of the rank dimension (replicated by default)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters. Frozen and hashable: it sits in model configs (jit statics).

    `targets` is a regex that must full-match a kernel's '/'-joined param path (the same
    path string the optimizer rules see), e.g. r".*/attention/(query|value)/kernel".
    In a scanned model (`scan_layers`) the kernels of the layer stack are matched on their
    per-layer paths (`model/layers_3/...`), as in the unrolled layout.
    """

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r".*/attention/(query|value)/kernel"
    # Set by models that scan their layers (`for_layer_stack`), not by users: (stack path,
    # layer count) pairs whose stacked kernels are matched on their per-layer paths.
    layer_stacks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank} (rank 0 means no LoRA)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoRA targets {self.targets!r} is not a valid regex: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, kernel_path: str) -> bool:
        """Whether the kernel at this '/'-joined param path gets a LoRA update.

        A stacked kernel is adapted when `targets` matches every one of its per-layer paths;
        matching only some is an error: a stacked adapter covers all layers or none.
        """
        paths = tree_paths.virtual_paths(kernel_path, dict(self.layer_stacks))
        hits = [re.fullmatch(self.targets, p) is not None for p in paths]
        if any(hits) and not all(hits):
            raise ValueError(
                f"peft.targets={self.targets!r} matches {sum(hits)} of the {len(hits)} layers "
                f"of the stacked kernel {kernel_path!r}; with model.scan_layers=True an adapter "
                "covers every layer of the stack (use model.scan_layers=False for per-layer ones)"
            )
        return hits[0]

    @classmethod
    def from_config(cls, peft: Mapping[str, Any]) -> LoraConfig | None:
        """`config.peft` -> LoraConfig, or None when `peft.rank` is 0 (LoRA off)."""
        if int(peft["rank"]) == 0:
            return None
        return cls(
            rank=int(peft["rank"]),
            alpha=float(peft["alpha"]),
            dropout=float(peft["dropout"]),
            targets=str(peft["targets"]),
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


def lora_initializers(
    kernel_init: Callable, kernel_shape: tuple[int, ...], in_axes: int
) -> tuple[Callable, Callable]:
    """Initialisers for A and B, carrying logical names derived from the kernel's.

    A gets (in-dims' names, "lora_rank") and B ("lora_rank", out-dims' names), so both are
    sharded by the rules that shard their base weight. A is HF PEFT's default init
    (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))); B is zero, so
    a fresh adapter leaves the model's outputs unchanged. Names are looked up lazily (inside
    the initialisers), so applying an initialised model costs nothing extra.
    """

    def kernel_names() -> tuple[str, ...] | None:
        boxed = jax.eval_shape(
            lambda: kernel_init(jax.random.PRNGKey(0), kernel_shape, jnp.float32)
        )
        return getattr(boxed, "names", None)

    def box(value: jax.Array, names: Callable[[tuple], tuple]) -> Any:
        base = kernel_names()
        return value if base is None else nn.LogicallyPartitioned(value, names(base))

    def init_a(rng: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
        value = jax.random.uniform(rng, shape, dtype, -bound, bound)
        return box(value, lambda base: (*base[:in_axes], RANK_AXIS))

    def init_b(rng: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        del rng
        return box(jnp.zeros(shape, dtype), lambda base: (RANK_AXIS, *base[in_axes:]))

    return init_a, init_b


# ----------------------------------------------------------------------------- param trees


def is_lora_path(path: str) -> bool:
    """Whether a '/'-joined param path names a LoRA leaf."""
    return path.rsplit("/", 1)[-1] in (LORA_A, LORA_B)


def flat_paths(params: Mapping[str, Any]) -> dict[str, Any]:
    """A nested param dict as {'/'-joined path: leaf}."""
    return traverse_util.flatten_dict(params, sep="/")


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flat_paths`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def lora_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Only the LoRA leaves of `params`, as a nested dict."""
    return nested({p: v for p, v in flat_paths(params).items() if is_lora_path(p)})


def merge(params: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """W + scale * A @ B for every adapted kernel, LoRA leaves removed.

    The result loads into the same model built without LoRA. The product is taken at full
    float32 precision (TPUs default to bf16 passes for matmuls). Stacked leaves (a leading
    layer axis on kernel, A and B) are merged layer by layer.
    """
    flat = flat_paths(params)
    merged = {p: v for p, v in flat.items() if not is_lora_path(p)}
    product = functools.partial(jnp.tensordot, axes=1, precision=jax.lax.Precision.HIGHEST)
    for path in (p for p in flat if p.endswith("/" + LORA_A)):
        layer = path[: -len(LORA_A)]
        kernel, a, b = flat[layer + "kernel"], flat[path], flat[layer + LORA_B]
        # A [*in, r] @ B [r, *out] has the kernel's rank; stacked, all three have one more dim.
        stacked = kernel.ndim == a.ndim + b.ndim - 3
        delta = jax.vmap(product)(a, b) if stacked else product(a, b)
        merged[layer + "kernel"] = (kernel + lora.scale * delta).astype(kernel.dtype)
    return nested(merged)


def lora_paths(paths: Iterable[str]) -> list[str]:
    """The LoRA leaves among a model's param paths (built with a LoraConfig).

    None at all means the `targets` regex matched no kernel: an error rather than a silent
    full freeze.
    """
    paths = list(paths)
    found = [p for p in paths if is_lora_path(p)]
    if not found:
        kernels = [p for p in paths if p.endswith("/kernel")]
        raise ValueError(
            f"peft.targets matches no kernel of this model; kernel paths look like {kernels[:4]}"
        )
    return found
