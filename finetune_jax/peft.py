"""LoRA: config, the low-rank update, initialisation, merging, and adapter files.

A LoRA layer computes `x @ W + scale * ((x @ A) @ B)` with W frozen, A [*in, r] and B
[r, *out] trainable, and `scale = alpha / rank`. The update is never merged into W before the
matmul: `(W + A @ B)` would make autodiff form the full dL/dW, which is exactly the work LoRA
exists to avoid. `layers.DenseND` holds the params next to its kernel (`<layer>/lora_a`,
`<layer>/lora_b`), so every rule over '/'-joined paths (freezing, sharding, decay) sees them.

This module imports no model code (the models import it), so the HF export takes the model
module as an argument and uses its `hf_param_mappings(config)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

LORA_A, LORA_B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"  # logical axis name of the rank dimension (replicated by default)
HF_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters. Frozen and hashable: it sits in model configs (jit statics).

    `targets` is a regex that must full-match a kernel's '/'-joined param path (the same
    path string the optimizer rules see), e.g. r".*/attention/(query|value)/kernel".
    """

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r".*/attention/(query|value)/kernel"

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
        """Whether the kernel at this '/'-joined param path gets a LoRA update."""
        return re.fullmatch(self.targets, kernel_path) is not None

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


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, in_axes: int) -> jax.Array:
    """`scale * ((x @ a) @ b)` contracting the last `in_axes` dims of x with a's leading ones.

    The scale multiplies the rank-r intermediate: r values per token instead of |out|.
    """
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    h = jax.lax.dot_general(x, a, (contract, ((), ()))) * jnp.asarray(scale, x.dtype)
    return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))


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


def _flat(params: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep="/")


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def lora_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Only the LoRA leaves of `params`, as a nested dict."""
    return _nested({p: v for p, v in _flat(params).items() if is_lora_path(p)})


def add_params(params: Mapping[str, Any], leaves: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with `leaves` ('/'-joined path -> value, e.g. `init_lora_params`'s) added."""
    return _nested({**_flat(params), **leaves})


def merge(params: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """W + scale * A @ B for every adapted kernel, LoRA leaves removed.

    The result loads into the same model built without LoRA. The product is taken at full
    float32 precision (TPUs default to bf16 passes for matmuls).
    """
    flat = _flat(params)
    merged = {p: v for p, v in flat.items() if not is_lora_path(p)}
    for path in (p for p in flat if p.endswith("/" + LORA_A)):
        layer = path[: -len(LORA_A)]
        kernel = flat[layer + "kernel"]
        delta = jnp.tensordot(
            flat[path], flat[layer + LORA_B], axes=1, precision=jax.lax.Precision.HIGHEST
        )
        merged[layer + "kernel"] = (kernel + lora.scale * delta).astype(kernel.dtype)
    return _nested(merged)


def init_lora_params(init_fn: Callable[[jax.Array], Any], seed: int) -> dict[str, np.ndarray]:
    """Host values of only the LoRA leaves of `init_fn(PRNGKey(seed))`, '/'-joined keys.

    Jitted, so XLA drops the random draws of every other param. A `targets` regex that
    matches no kernel is an error rather than a silent full freeze.
    """
    shapes = _flat(jax.eval_shape(init_fn, jax.random.PRNGKey(seed)))
    if not any(is_lora_path(p) for p in shapes):
        kernels = [p for p in shapes if p.endswith("/kernel")]
        raise ValueError(
            f"peft.targets matches no kernel of this model; kernel paths look like {kernels[:4]}"
        )

    def init(rng: jax.Array) -> dict[str, jax.Array]:
        flat = _flat(nn.meta.unbox(init_fn(rng)))
        return {p: v for p, v in flat.items() if is_lora_path(p)}

    return jax.device_get(jax.jit(init)(jax.random.PRNGKey(seed)))


# ----------------------------------------------------------------------------- files


def save_adapter(params: Mapping[str, Any], path: str, lora: LoraConfig | None = None) -> None:
    """Writes the LoRA leaves as safetensors keyed by '/'-joined path (+ the config, if given)."""
    tensors = {p: np.ascontiguousarray(v) for p, v in _flat(lora_params(params)).items()}
    metadata = {"lora": json.dumps(dataclasses.asdict(lora))} if lora is not None else None
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def load_adapter(params: Mapping[str, Any], path: str) -> dict[str, Any]:
    """`params` with its LoRA leaves replaced by those saved at `path`.

    The file must hold exactly the model's LoRA leaves at their shapes; anything else is a
    ValueError naming the paths, so an adapter never half-loads into another model.
    """
    loaded = safetensors.numpy.load_file(path)
    flat = _flat(params)
    ours = {p for p in flat if is_lora_path(p)}
    if set(loaded) != ours:
        raise ValueError(
            f"adapter {path} does not fit this model: missing {sorted(ours - set(loaded))[:4]}, "
            f"unexpected {sorted(set(loaded) - ours)[:4]}"
        )
    for p, value in loaded.items():
        if tuple(value.shape) != tuple(np.shape(flat[p])):
            raise ValueError(
                f"adapter {path}: {p} has shape {value.shape}, model needs {np.shape(flat[p])}"
            )
        flat[p] = value
    return _nested(flat)


def _param_to_hf(mapping: Any, value: Any) -> np.ndarray:
    """Our param -> HF layout; `layers.param_to_hf`, restated because layers imports us."""
    array = np.asarray(value, np.float32)
    if mapping.transpose:
        return np.ascontiguousarray(array.reshape(mapping.hf_shape[::-1]).T)
    return np.ascontiguousarray(array.reshape(mapping.hf_shape))


def hf_lora_tensors(params: Mapping[str, Any], mappings: Sequence[Any]) -> dict[str, np.ndarray]:
    """LoRA leaves -> HF PEFT tensors `<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r].

    `mappings` are `HFMapping` rows with full paths and keys. Our kernel flattened to
    [in, out] is the HF Linear weight transposed, so A [*in, r] -> [in, r] -> A.T and
    B [r, *out] -> [r, out] -> B.T; split-head kernels flatten in HF's row-major order.
    """
    flat = _flat(params)
    tensors, mapped = {}, set()
    for m in mappings:
        layer = m.path.removesuffix("kernel")
        if not m.path.endswith("/kernel") or layer + LORA_A not in flat:
            continue
        if not m.transpose or len(m.hf_shape) != 2:
            raise ValueError(f"{m.path} is not a torch Linear weight; HF PEFT cannot adapt it")
        out_features, in_features = m.hf_shape
        a = np.asarray(flat[layer + LORA_A], np.float32).reshape(in_features, -1)
        b = np.asarray(flat[layer + LORA_B], np.float32).reshape(-1, out_features)
        module = HF_PREFIX + m.hf_key.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(b.T)
        mapped |= {layer + LORA_A, layer + LORA_B}
    unmapped = sorted(p for p in flat if is_lora_path(p) and p not in mapped)
    if unmapped:
        raise ValueError(f"no HF weight for the kernels of these LoRA params: {unmapped[:4]}")
    return tensors


def save_hf_peft(
    params: Mapping[str, Any],
    lora: LoraConfig,
    model_lib: Any,
    model_config: Any,
    out_dir: str,
    base_model_name: str,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> None:
    """Writes an HF PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).

    `PeftModel.from_pretrained(<HF base model>, out_dir)` then computes what our model does
    with these params. `modules_to_save` are our param-path prefixes of trained non-LoRA
    modules saved whole (None: the model's `PEFT_MODULES_TO_SAVE`, its new task head);
    `task_type` defaults to the model's `PEFT_TASK_TYPE`. Target modules are listed by full
    HF name, so e.g. `attention.output.dense` and `pooler.dense` are never confused.
    """
    mappings = model_lib.hf_param_mappings(model_config)
    tensors = hf_lora_tensors(params, mappings)
    targets = sorted({k.removeprefix(HF_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    if modules_to_save is None:
        modules_to_save = model_lib.PEFT_MODULES_TO_SAVE
    flat, saved = _flat(params), set()
    for m in mappings:
        if m.path in flat and any(m.path.startswith(p + "/") for p in modules_to_save):
            tensors[HF_PREFIX + m.hf_key] = _param_to_hf(m, flat[m.path])
            saved.add(m.hf_key.rsplit(".", 1)[0])
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type or model_lib.PEFT_TASK_TYPE,
        "base_model_name_or_path": base_model_name,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "modules_to_save": sorted(saved) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    safetensors.numpy.save_file(
        tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"}
    )
