"""Optimizer from config data: presets -> rules -> labels -> one optax transform.

Every parameter gets a *group label* from two rule lists in the config: which params train
and at what learning-rate multiplier (`optim.preset` / `optim.rules`), and which get weight
decay (`optim.decay_rules`). Each group becomes one AdamW inside `optax.multi_transform`;
frozen params get `optax.set_to_zero()`, so they hold no optimizer state and -- because
nothing reads their gradient -- XLA does not compute it. Gradient clipping is masked to the
trainable leaves for the same reason: a global norm over every leaf would read (and so
compute) the frozen gradients too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from finetune_jax import tree_paths
from finetune_jax.models import quantization, quantized_kernels
from finetune_jax.models.lora import ADAPTER_LEAVES
from finetune_jax.training import layer_groups, low_precision
from finetune_jax.training import rules as rules_lib

FROZEN = "frozen"
PRESETS = ("full", "linear_probe", "bitfit", "top_k_layers", "llrd", "lora", "peft", "rules")


def _layer_paths(paths: list[str], layer_regex: str) -> dict[int, list[str]]:
    """Layer index -> the parameter paths of that layer (`optim.layer`'s group 1)."""
    layers: dict[int, list[str]] = {}
    for path in paths:
        if m := re.fullmatch(layer_regex, path):
            layers.setdefault(int(m.group(1)), []).append(path)
    if not layers:
        raise rules_lib.RuleError(
            f"optim.layer={layer_regex!r} finds no layer index in any parameter path; the "
            "top_k_layers and llrd presets need it (group 1 must capture the layer number)"
        )
    return layers


def _exactly(paths: list[str]) -> str:
    """A regex matching exactly these paths. Built from the paths `optim.layer` matched,
    not by editing that regex, so any regex with the index in group 1 works."""
    return "|".join(re.escape(p) for p in paths)


def preset_rules(optim: ml_collections.ConfigDict, paths: list[str]) -> list[tuple[str, Any]]:
    """The (regex, label) rules a preset stands for, given the model's parameter paths."""
    head, preset = optim.head, optim.preset
    if preset == "full":
        return [(".*", "trainable")]
    if preset == "linear_probe":
        return [(head, "trainable"), (".*", FROZEN)]
    if preset == "bitfit":
        return [(head, "trainable"), (r".*/bias", "trainable"), (".*", FROZEN)]
    if preset in ("lora", "peft"):  # any PEFT method's adapter params + the head; base frozen
        adapters = "|".join(ADAPTER_LEAVES)
        return [(rf".*/({adapters})", "trainable"), (head, "trainable"), (".*", FROZEN)]
    if preset == "top_k_layers":
        layers = _layer_paths(paths, optim.layer)
        n = max(layers) + 1
        if not 0 <= optim.top_k <= n:
            raise ValueError(f"optim.top_k={optim.top_k} must be between 0 and the {n} layers")
        top = [p for i in range(n - optim.top_k, n) for p in layers.get(i, [])]
        rules = [(head, "trainable")] + ([(_exactly(top), "trainable")] if top else [])
        return rules + [(".*", FROZEN)]
    if preset == "llrd":
        # ELECTRA-style: head depth N+1 (x1), layer i depth i+1, embeddings depth 0.
        layers = _layer_paths(paths, optim.layer)
        n = max(layers) + 1
        rules = [(head, 1.0)]
        rules += [(_exactly(layers[i]), float(optim.llrd_decay ** (n - i))) for i in sorted(layers)]
        return rules + [(".*", float(optim.llrd_decay ** (n + 1)))]
    if preset == "rules":
        if not optim.rules:
            raise ValueError(
                "optim.preset='rules' needs optim.rules: a list of (regex, label) pairs"
            )
        return rules_lib.as_pairs(optim.rules)
    raise ValueError(f"optim.preset={preset!r} is not one of {PRESETS}")


def lr_multiplier(label: Any) -> float | None:
    """None for frozen; the lr multiplier otherwise ('trainable' = 1.0)."""
    if label == FROZEN:
        return None
    if label == "trainable":
        return 1.0
    try:
        value = float(label)
    except (TypeError, ValueError):
        raise ValueError(
            f"rule label {label!r} is not 'trainable', 'frozen' or an lr multiplier (a number)"
        ) from None
    if value < 0:
        raise ValueError(f"lr multiplier {value} must be >= 0")
    return value


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Per-leaf group labels and the multiplier / decay each group stands for."""

    labels: Any  # tree of str, shaped like params
    trainable: Any  # tree of bool
    multipliers: dict[str, float | None]
    decay: dict[str, bool]
    # `optim.rules` regexes that decide no parameter (a typo, or shadowed by an earlier rule).
    unused_rules: tuple[str, ...] = ()
    # Groups of stacked leaves whose layers got different labels (`layer_groups`); their
    # `multipliers` / `decay` entries hold the largest multiplier / whether any layer decays.
    per_layer: dict[str, layer_groups.LayerLabels] = dataclasses.field(default_factory=dict)


def param_groups(
    optim: ml_collections.ConfigDict, params: Any, layer_stacks: Mapping[str, int] | None = None
) -> ParamGroups:
    """Resolve the trainability and decay rules over `params` into group labels.

    `layer_stacks` (the family's, in the scanned layout) names the stacked leaves: the rules
    are resolved on each of their per-layer paths, so they mean what they mean unrolled.
    """
    paths = tree_paths.param_paths(params)
    per_leaf = [tree_paths.virtual_paths(p, layer_stacks or {}) for p in paths]
    virtual = [v for vs in per_leaf for v in vs]
    train_rules = preset_rules(optim, virtual)
    mults = iter(
        rules_lib.resolve_paths(train_rules, virtual, name="optim.rules", transform=lr_multiplier)
    )
    decays = iter(
        rules_lib.resolve_paths(
            rules_lib.as_pairs(optim.decay_rules), virtual, name="optim.decay_rules"
        )
    )
    multipliers, decay, per_layer = {}, {}, {}

    def label(leaf_paths: list[str]) -> str:
        mult = [next(mults) for _ in leaf_paths]
        dec = [next(decays) for _ in leaf_paths]
        layers = layer_groups.layer_labels(mult, dec)
        if layers is not None:
            name = layers.group_name(per_layer)
            per_layer[name] = layers
            multipliers[name] = max(m for m in mult if m is not None)
            decay[name] = any(layers.decay)
        elif mult[0] is None:
            name = FROZEN
            multipliers[name], decay[name] = None, False
        else:
            name = f"lr x{mult[0]:.4g}" + ("" if dec[0] else " no-decay")
            multipliers[name], decay[name] = mult[0], bool(dec[0])
        return name

    treedef = jax.tree.structure(params)
    labels = jax.tree.unflatten(treedef, [label(vs) for vs in per_leaf])
    trainable = jax.tree.map(lambda label: label != FROZEN, labels)
    _check_trainable_leaves(paths, jax.tree.leaves(params), jax.tree.leaves(trainable), optim)
    if not any(jax.tree.leaves(trainable)):
        raise ValueError(
            f"optim.preset={optim.preset!r} (optim.head={optim.head!r}"
            + (f", optim.rules={optim.rules!r}" if optim.preset == "rules" else "")
            + ") leaves no parameter trainable: nothing would learn"
        )
    unused = []
    if optim.preset == "rules":
        unused = rules_lib.unused_rules_of_paths(train_rules, virtual)
    return ParamGroups(labels, trainable, multipliers, decay, tuple(unused), per_layer)


def _check_trainable_leaves(paths, leaves, trainable, optim: ml_collections.ConfigDict) -> None:
    """A rule that trains a leaf of a quantized base kernel (`peft.quantize`: its integer
    codes or its scales) or any other integer leaf is an error naming it: codes have no
    gradient, and the base under a QLoRA adapter stays frozen."""
    for path, leaf, train in zip(paths, leaves, trainable):
        integer = not jnp.issubdtype(leaf.dtype, jnp.inexact)
        if train and (integer or quantized_kernels.is_quantized_path(path)):
            raise rules_lib.RuleError(
                f"optim.preset={optim.preset!r} would train {path!r} ({leaf.dtype}), a leaf of "
                "a quantized frozen kernel (peft.quantize), which cannot train: freeze it (its "
                "adapter trains instead: optim.preset=lora) or set peft.quantize_targets to "
                "leave that kernel float"
            )


def schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then linear / cosine decay to 0 (or constant)."""
    warmup = int(round(optim.warmup_fraction * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "linear":
        after = optax.linear_schedule(optim.lr, 0.0, decay_steps)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, decay_steps)
    elif optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not linear, cosine or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def with_state_dtype(
    inner: optax.GradientTransformation, dtype: Any
) -> optax.GradientTransformation:
    """`inner` whose floating state leaves are stored in `dtype` (`optim.state_dtype`).

    Adam's moments otherwise follow the params' dtype at init and the gradients' after a
    step; a fixed dtype keeps the state tree (checkpoints, shardings, donation) stable.
    """

    def init(params: Any) -> Any:
        return low_precision.cast_floating(inner.init(params), dtype)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(updates, state, params)
        return updates, low_precision.cast_floating(state, dtype)

    return optax.GradientTransformation(init, update)


def rounding_mode(config: ml_collections.ConfigDict) -> str:
    """The run's `optim.bf16_rounding`, with "auto" resolved against its storage dtypes."""
    return low_precision.resolve_mode(
        config.optim.bf16_rounding, config.model.param_dtype, config.optim.state_dtype
    )


def make_optimizer(
    optim: ml_collections.ConfigDict,
    groups: ParamGroups,
    total_steps: int,
    rounding: str = "nearest",
    seed: int = 0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One optax transform: masked clipping, then an AdamW per group, set_to_zero if frozen
    (a per-layer AdamW for per-layer groups, whose frozen layers' gradients are zeroed first).

    Each AdamW stores its moments in `optim.state_dtype` and lands its updates in bf16
    params by `rounding` (the run's resolved `optim.bf16_rounding`: `rounding_mode`), its
    random bits drawn from `seed`.
    """
    lr = schedule(optim, total_steps)

    def adam() -> optax.GradientTransformation:
        if rounding == "nearest":
            return optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)
        return low_precision.scale_by_adam(optim.b1, optim.b2, optim.eps, optim.state_dtype, seed)

    def stored(adamw: optax.GradientTransformation) -> optax.GradientTransformation:
        if rounding == "nearest":
            return with_state_dtype(adamw, jnp.dtype(optim.state_dtype))
        return low_precision.rounded(adamw, rounding, seed)

    transforms = {}
    for name, mult in groups.multipliers.items():
        if name in groups.per_layer:
            transforms[name] = stored(
                layer_groups.per_layer_adamw(optim, lr, groups.per_layer[name], adam())
            )
        elif mult is None:
            transforms[name] = optax.set_to_zero()
        else:
            # optax.adamw's chain (and so its state tree) with our Adam moments.
            decay = optim.weight_decay if groups.decay[name] else 0.0
            transforms[name] = stored(
                optax.chain(
                    adam(),
                    optax.add_decayed_weights(decay),
                    optax.scale_by_learning_rate(lambda step, m=mult: lr(step) * m),
                )
            )
    chain = []
    if any(not all(layers.trained) for layers in groups.per_layer.values()):
        chain.append(layer_groups.zero_frozen_layers(groups.labels, groups.per_layer))
    if optim.clip_norm > 0:
        chain.append(optax.masked(optax.clip_by_global_norm(optim.clip_norm), groups.trainable))
    chain.append(optax.multi_transform(transforms, groups.labels))
    return optax.chain(*chain), lr


def group_table(groups: ParamGroups, params: Any) -> str:
    """A printable table: group, #params, #tensors, lr multiplier, weight decay."""
    counts: dict[str, list[int]] = {name: [0, 0] for name in groups.multipliers}
    for label, (path, leaf) in zip(jax.tree.leaves(groups.labels), _leaves(params)):
        counts[label][0] += quantization.weights(path, leaf.shape)
        counts[label][1] += 1
    total = sum(c[0] for c in counts.values())
    trainable = param_counts(groups, params)[0]
    # Per-layer groups (stacked layers) have long names and a range of multipliers.
    width = max([22, *(len(name) + 2 for name in counts)])
    mult_width = max([10, *(len(p.span) + 2 for p in groups.per_layer.values())])
    lines = [
        f"{'group':<{width}}{'#params':>12}{'#tensors':>10}{'lr mult':>{mult_width}}{'decay':>7}"
    ]
    for name in sorted(
        counts, key=lambda n: (groups.multipliers[n] is None, -(groups.multipliers[n] or 0))
    ):
        mult = groups.multipliers[name]
        shown = "-" if mult is None else f"{mult:.4g}"
        if name in groups.per_layer:
            shown = groups.per_layer[name].span
        lines.append(
            f"{name:<{width}}{counts[name][0]:>12,}{counts[name][1]:>10}"
            f"{shown:>{mult_width}}{'yes' if groups.decay[name] else 'no':>7}"
        )
    lines.append(
        f"{'trainable / total':<{width}}{trainable:>12,} / {total:,} "
        f"({100 * trainable / max(total, 1):.2f}%)"
    )
    if any(not all(layers.trained) for layers in groups.per_layer.values()):
        lines.append(
            "note: per-layer (stacked) groups keep optimizer state and compute gradients for "
            "their frozen layers too (lr x0; the logged grad_norm includes those gradients); "
            "model.scan_layers=False avoids that"
        )
    if groups.unused_rules:
        lines.append(
            f"warning: optim.rules {list(groups.unused_rules)} decide no parameter (a typo, or "
            "an earlier rule matches first)"
        )
    return "\n".join(lines)


def _leaves(params: Any) -> list[tuple[str, Any]]:
    return list(zip(tree_paths.param_paths(params), jax.tree.leaves(params)))


def param_counts(groups: ParamGroups, params: Any) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; a per-layer group's frozen layers are frozen; a
    quantized kernel counts the weights it stores (`quantization.weights`)."""
    trainable = total = 0
    for (path, leaf), label in zip(_leaves(params), jax.tree.leaves(groups.labels)):
        size = quantization.weights(path, leaf.shape)
        total += size
        layers = groups.per_layer.get(label)
        trainable += layer_groups.trained_size(size, layers, label != FROZEN)
    return trainable, total - trainable


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a tree (e.g. an optimizer state)."""
    return sum(
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype")
    )
