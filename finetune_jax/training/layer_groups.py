"""Optimizer groups of stacked layer params (`model.scan_layers`) whose layers disagree.

In the scanned layout one leaf holds every layer of a stack along its leading axis, while
the rules (`optim.rules`, presets, `optim.decay_rules`) are written against per-layer paths
(`.*/layers_3/.*`). `optim.param_groups` resolves a stacked leaf on each of its per-layer
paths; when all layers agree the leaf simply joins that group. When they differ (llrd's
multipliers, top_k_layers' frozen layers) the leaf joins a *per-layer group*, described here
by `LayerLabels`: its AdamW scales each layer's update by that layer's lr multiplier (0 for
a frozen layer) and decays only the layers the decay rules select. Unlike a frozen leaf, such
a leaf holds optimizer state for all its layers, and its gradient is computed for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class LayerLabels:
    """Per layer of a stacked leaf: the lr multiplier (None: frozen) and weight decay."""

    multipliers: tuple[float | None, ...]
    decay: tuple[bool, ...]  # False for frozen layers

    @property
    def trained(self) -> tuple[bool, ...]:
        return tuple(m is not None for m in self.multipliers)

    @property
    def span(self) -> str:
        """The range of lr multipliers over the layers, frozen ones counting as 0."""
        values = [0.0 if m is None else m for m in self.multipliers]
        low, high = min(values), max(values)
        return f"{high:.4g}" if low == high else f"{low:.4g}..{high:.4g}"

    def group_name(self, taken: Mapping[str, LayerLabels]) -> str:
        """A printable group name, e.g. "per-layer lr x0..1 no-decay (4 layers, stacked)",
        made unique among the `taken` names of other per-layer groups."""
        decays = [d for d, t in zip(self.decay, self.trained) if t]
        decay = "" if all(decays) else " no-decay" if not any(decays) else " decay per layer"
        base = f"per-layer lr x{self.span}{decay} ({len(self.multipliers)} layers, stacked)"
        name, count = base, 1
        while name in taken and taken[name] != self:
            count += 1
            name = f"{base} #{count}"
        return name


def layer_labels(multipliers: list[float | None], decays: list[bool]) -> LayerLabels | None:
    """The per-layer labels of a stacked leaf, or None when all its layers agree."""
    decays = [bool(d) and m is not None for m, d in zip(multipliers, decays)]
    if len(set(multipliers)) == 1 and len(set(decays)) == 1:
        return None
    return LayerLabels(tuple(multipliers), tuple(decays))


def _along_layers(vector_L: jax.Array, leaf: jax.Array) -> jax.Array:
    """A per-layer vector [L] shaped to broadcast over a stacked leaf [L, ...]."""
    return vector_L.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def _add_layer_decay(rates_L: jax.Array) -> optax.GradientTransformation:
    """`optax.add_decayed_weights` with one rate per layer."""

    def update(updates, state, params):
        decay = lambda g, p: g + _along_layers(rates_L, p) * p
        return jax.tree.map(decay, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale_by_layer_schedule(lr_fn: optax.Schedule, mults_L: jax.Array):
    """`optax.scale_by_learning_rate(lambda step: lr_fn(step) * m)` with one multiplier m per
    layer: the same arithmetic as an unrolled layer's group, so both layouts step alike."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        step_L = -1 * (lr_fn(state.count) * mults_L)
        updates = jax.tree.map(lambda g: _along_layers(step_L, g) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def per_layer_adamw(
    optim: ml_collections.ConfigDict,
    lr_fn: optax.Schedule,
    labels: LayerLabels,
    adam: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """AdamW (as `optax.adamw`, its moments from `adam`) whose lr multiplier and weight
    decay vary along the layers."""
    mults_L = jnp.asarray([0.0 if m is None else m for m in labels.multipliers], jnp.float32)
    parts = [adam]
    if optim.weight_decay and any(labels.decay):
        rates_L = jnp.asarray([optim.weight_decay if d else 0.0 for d in labels.decay])
        parts.append(_add_layer_decay(rates_L.astype(jnp.float32)))
    parts.append(_scale_by_layer_schedule(lr_fn, mults_L))
    return optax.chain(*parts)


def zero_frozen_layers(
    labels: Any, per_layer: Mapping[str, LayerLabels]
) -> optax.GradientTransformation:
    """Zeroes the gradients of the frozen layers of per-layer groups' leaves.

    Chained first, so gradient clipping's global norm leaves those layers out, as it leaves
    out frozen leaves, and their Adam moments stay zero. `labels` is the params-shaped tree
    of group names.
    """
    keep = {name: jnp.asarray(ls.trained, jnp.float32) for name, ls in per_layer.items()}

    def mask(g: jax.Array, label: str) -> jax.Array:
        return g * _along_layers(keep[label], g) if label in keep else g

    def update(updates, state, params=None):
        del params
        return jax.tree.map(mask, updates, labels), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def trained_size(size: int, labels: LayerLabels | None, trainable: bool) -> int:
    """How many of a leaf's `size` values train (a per-layer group's frozen layers do not)."""
    if labels is None:
        return size if trainable else 0
    return size // len(labels.trained) * sum(labels.trained)
