"""BERT encoder (HF `model_type == "bert"`): config, Flax linen modules, HF weight conversion.

Param names mirror HF (`LayerNorm`, `intermediate`, `output`) so the mapping below is easy to
audit; every param carries logical axis names so sharding is decided by a rules table.
Parity with `transformers.BertModel` is checked in tests/test_bert.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import peft, weights
from finetune_jax.models import layers
from finetune_jax.models.layers import HFMapping

# Activations are constrained to these logical axes at block boundaries.
ACTIVATION_AXES = ("batch", "length", "activation_embed")
# HF PEFT task type of the exported adapter, and the modules it saves whole: the classifier
# and pooler, new or trained in the `lora` preset (our param-path prefixes).
PEFT_TASK_TYPE = "SEQ_CLS"
PEFT_MODULES_TO_SAVE = ("classifier", "bert/pooler")
HEAD_BIAS = "classifier/bias"  # the new task head's bias (see model.head_bias_init)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture and head hyper-parameters; field names follow HF's BertConfig."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int = 2  # 1 means regression
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: str = "none"  # none | full | dots_saveable (see layers.remat_policy)
    lora: peft.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match

    def __post_init__(self) -> None:
        layers.get_activation(self.hidden_act)  # fail at config time, not mid-trace
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from an HF config.json dict; unknown HF keys are ignored."""
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            # Relative position variants change the attention maths; refuse rather than
            # silently load weights into the wrong model.
            raise ValueError(f"position_embedding_type {position_type!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        # HF's "dtype" is how the checkpoint was stored, not our compute dtype: skip it.
        kwargs = {k: v for k, v in hf_config.items() if k in names and k != "dtype"}
        if "num_labels" not in hf_config and hf_config.get("id2label"):
            kwargs["num_labels"] = len(hf_config["id2label"])  # HF stores labels, not a count
        kwargs.update(overrides)
        return cls(**kwargs)


def _normal(config: BertConfig, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=jnp.float32,
        # Two-pass variance: the fast E[x^2]-E[x]^2 form costs ~1e-5 of parity with torch.
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids_BL, token_type_ids_BL, deterministic: bool = True):
        cfg = self.config

        def embed(num: int, axis: str, name: str) -> nn.Embed:
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=jnp.float32,
                embedding_init=_normal(cfg, (axis, "embed")),
                name=name,
            )

        positions_1L = jnp.arange(input_ids_BL.shape[1])[None, :]
        x_BLD = (
            embed(cfg.vocab_size, "vocab", "word_embeddings")(input_ids_BL)
            + embed(cfg.max_position_embeddings, "position", "position_embeddings")(positions_1L)
            + embed(cfg.type_vocab_size, "token_type", "token_type_embeddings")(token_type_ids_BL)
        )
        x_BLD = _layer_norm(cfg, "LayerNorm")(x_BLD)
        return nn.Dropout(cfg.hidden_dropout_prob)(x_BLD, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention + output projection + residual LayerNorm (HF BertAttention)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_bias_B11L, deterministic: bool = True):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name: str) -> jax.Array:
            return layers.DenseND(
                features=(heads, head_dim),
                dtype=cfg.dtype,
                kernel_init=_normal(cfg, ("embed", "heads", "kv")),
                bias_init=_zeros(("heads", "kv")),
                lora=cfg.lora,
                name=name,
            )(x_BLD, deterministic)

        # Scale q (L*D values) rather than the scores (L*L*H values); same maths.
        q_BLHK = project("query") * jnp.asarray(head_dim**-0.5, cfg.dtype)
        k_BLHK, v_BLHK = project("key"), project("value")
        scores_BHLL = jnp.einsum("bqhd,bkhd->bhqk", q_BLHK, k_BLHK)
        # Softmax in float32 whatever the compute dtype: bf16 exp/sum loses too much.
        probs_BHLL = jax.nn.softmax(scores_BHLL.astype(jnp.float32) + mask_bias_B11L, axis=-1)
        probs_BHLL = nn.Dropout(cfg.attention_probs_dropout_prob)(
            probs_BHLL, deterministic=deterministic
        ).astype(cfg.dtype)
        context_BLHK = jnp.einsum("bhqk,bkhd->bqhd", probs_BHLL, v_BLHK)
        out_BLD = layers.DenseND(
            features=(cfg.hidden_size,),
            in_axes=2,
            dtype=cfg.dtype,
            kernel_init=_normal(cfg, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)),
            lora=cfg.lora,
            name="output",
        )(context_BLHK, deterministic)
        out_BLD = nn.Dropout(cfg.hidden_dropout_prob)(out_BLD, deterministic=deterministic)
        return _layer_norm(cfg, "LayerNorm")(out_BLD + x_BLD)


class BertOutput(nn.Module):
    """FFN down-projection + dropout + residual LayerNorm.

    The projection shares this module's scope (`nn.share_scope`), so its params sit at
    `output/kernel` next to `output/LayerNorm`, as in HF's layout.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, h_BLF, residual_BLD, deterministic: bool = True):
        cfg = self.config
        dense = layers.DenseND(
            features=(cfg.hidden_size,),
            dtype=cfg.dtype,
            kernel_init=_normal(cfg, ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            lora=cfg.lora,
            name="dense",
        )
        nn.share_scope(self, dense)
        out_BLD = dense(h_BLF, deterministic)
        out_BLD = nn.Dropout(cfg.hidden_dropout_prob)(out_BLD, deterministic=deterministic)
        return _layer_norm(cfg, "LayerNorm")(out_BLD + residual_BLD)


class BertLayer(nn.Module):
    """One transformer block: attention, then the GELU MLP."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_bias_B11L, deterministic: bool = True):
        cfg = self.config
        x_BLD = BertSelfAttention(cfg, name="attention")(x_BLD, mask_bias_B11L, deterministic)
        h_BLF = layers.DenseND(
            features=(cfg.intermediate_size,),
            dtype=cfg.dtype,
            kernel_init=_normal(cfg, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
            lora=cfg.lora,
            name="intermediate",
        )(x_BLD, deterministic)
        h_BLF = layers.get_activation(cfg.hidden_act)(h_BLF)
        x_BLD = BertOutput(cfg, name="output")(h_BLF, x_BLD, deterministic)
        return nn.with_logical_constraint(x_BLD, ACTIVATION_AXES)


class BertEncoder(nn.Module):
    """The stack of `layer_{i}` blocks; returns the last hidden state [B, L, D]."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, attention_mask_BL, deterministic: bool = True):
        cfg = self.config
        # static_argnums counts `self` as 0, so 3 is `deterministic` (a Python bool).
        block = layers.remat(BertLayer, cfg.remat, static_argnums=(3,))
        mask_bias_B11L = layers.additive_attention_mask(attention_mask_BL)
        for i in range(cfg.num_hidden_layers):
            x_BLD = block(cfg, name=f"layer_{i}")(x_BLD, mask_bias_B11L, deterministic)
        return x_BLD


class BertPooler(nn.Module):
    """Dense + tanh on the first ([CLS]) token."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.config
        return jnp.tanh(
            nn.Dense(
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=jnp.float32,
                kernel_init=_normal(cfg, ("embed", "mlp")),
                bias_init=_zeros(("mlp",)),
                name="dense",
            )(x_BLD[:, 0])
        )


class BertModel(nn.Module):
    """Embeddings + encoder + pooler; returns (last_hidden_state [B,L,D], pooled [B,D])."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x_BLD = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        x_BLD = nn.with_logical_constraint(x_BLD, ACTIVATION_AXES)
        x_BLD = BertEncoder(self.config, name="encoder")(x_BLD, attention_mask, deterministic)
        return x_BLD, BertPooler(self.config, name="pooler")(x_BLD)


class BertForSequenceClassification(nn.Module):
    """BertModel + dropout + `classifier` Dense; returns float32 logits [B, num_labels]."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg = self.config
        _, pooled_BD = BertModel(cfg, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled_BD = nn.Dropout(rate)(pooled_BD.astype(jnp.float32), deterministic=deterministic)
        # The head is tiny, so it runs in float32 and logits never come out in bf16.
        return nn.Dense(
            cfg.num_labels,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=_normal(cfg, ("embed", "classes")),
            bias_init=_zeros(("classes",)),
            name="classifier",
        )(pooled_BD)


# ----------------------------------------------------------------------------- HF weights


def hf_mappings(config: BertConfig) -> list[HFMapping]:
    """The HF BertModel tensors (keys without `bert.`) and where they go in our `bert` subtree."""
    d, f, h, k = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.head_dim,
    )
    rows = [
        HFMapping(
            "embeddings.word_embeddings.weight",
            "embeddings/word_embeddings/embedding",
            (config.vocab_size, d),
            (config.vocab_size, d),
        ),
        HFMapping(
            "embeddings.position_embeddings.weight",
            "embeddings/position_embeddings/embedding",
            (config.max_position_embeddings, d),
            (config.max_position_embeddings, d),
        ),
        HFMapping(
            "embeddings.token_type_embeddings.weight",
            "embeddings/token_type_embeddings/embedding",
            (config.type_vocab_size, d),
            (config.type_vocab_size, d),
        ),
    ]

    def layer_norm(hf: str, ours: str) -> list[HFMapping]:
        return [
            HFMapping(f"{hf}.weight", f"{ours}/scale", (d,), (d,)),
            HFMapping(f"{hf}.bias", f"{ours}/bias", (d,), (d,)),
        ]

    rows += layer_norm("embeddings.LayerNorm", "embeddings/LayerNorm")
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        for name in ("query", "key", "value"):
            rows.append(
                HFMapping(
                    f"{hf}.attention.self.{name}.weight",
                    f"{ours}/attention/{name}/kernel",
                    (d, d),
                    (d, h, k),
                    True,
                )
            )
            rows.append(
                HFMapping(
                    f"{hf}.attention.self.{name}.bias",
                    f"{ours}/attention/{name}/bias",
                    (d,),
                    (h, k),
                )
            )
        rows += [
            HFMapping(
                f"{hf}.attention.output.dense.weight",
                f"{ours}/attention/output/kernel",
                (d, d),
                (h, k, d),
                True,
            ),
            HFMapping(
                f"{hf}.attention.output.dense.bias", f"{ours}/attention/output/bias", (d,), (d,)
            ),
            *layer_norm(f"{hf}.attention.output.LayerNorm", f"{ours}/attention/LayerNorm"),
            HFMapping(
                f"{hf}.intermediate.dense.weight",
                f"{ours}/intermediate/kernel",
                (f, d),
                (d, f),
                True,
            ),
            HFMapping(f"{hf}.intermediate.dense.bias", f"{ours}/intermediate/bias", (f,), (f,)),
            HFMapping(f"{hf}.output.dense.weight", f"{ours}/output/kernel", (d, f), (f, d), True),
            HFMapping(f"{hf}.output.dense.bias", f"{ours}/output/bias", (d,), (d,)),
            *layer_norm(f"{hf}.output.LayerNorm", f"{ours}/output/LayerNorm"),
        ]
    rows += [
        HFMapping("pooler.dense.weight", "pooler/dense/kernel", (d, d), (d, d), True),
        HFMapping("pooler.dense.bias", "pooler/dense/bias", (d,), (d,)),
    ]
    return rows


def hf_param_mappings(config: BertConfig) -> list[HFMapping]:
    """Every param of BertForSequenceClassification: full paths and full HF keys."""
    rows = [
        m._replace(hf_key="bert." + m.hf_key, path="bert/" + m.path) for m in hf_mappings(config)
    ]
    labels, d = config.num_labels, config.hidden_size
    return rows + [
        HFMapping("classifier.weight", "classifier/kernel", (labels, d), (d, labels), True),
        HFMapping("classifier.bias", "classifier/bias", (labels,), (labels,)),
    ]


def from_hf(
    hf_tensors: dict[str, np.ndarray], config: BertConfig
) -> tuple[dict[str, Any], list[str]]:
    """HF tensors -> (our `bert` subtree, missing subtrees).

    Keys may carry the `bert.` prefix (task-head checkpoints) or not (bare BertModel). Only
    the encoder is converted: the task head is new and comes from init. A checkpoint without
    pooler weights gives `missing == ["bert/pooler"]` and no `pooler` entry; the caller keeps
    its initialised pooler. Missing or wrongly shaped tensors raise ValueError.
    """
    prefix = "bert." if any(key.startswith("bert.") for key in hf_tensors) else ""
    return layers.convert_from_hf(
        hf_tensors,
        hf_mappings(config),
        key_prefix=prefix,
        path_prefix="bert",
        optional_groups=("pooler",),
    )


def to_hf(params: dict[str, Any], config: BertConfig) -> dict[str, np.ndarray]:
    """Our unboxed params -> HF BertForSequenceClassification tensors (`bert.` prefix)."""
    tensors = layers.convert_to_hf(params["bert"], hf_mappings(config), key_prefix="bert.")
    if "classifier" in params:
        kernel = np.asarray(params["classifier"]["kernel"], np.float32)
        tensors["classifier.weight"] = np.ascontiguousarray(kernel.T)
        tensors["classifier.bias"] = np.asarray(params["classifier"]["bias"], np.float32)
    return tensors


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: BertConfig, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Initialises BertForSequenceClassification; returns the boxed (nn.Partitioned) params.

    Jitted (config is static) because eager init dispatches hundreds of tiny ops. For shapes
    and logical names without allocating: `jax.eval_shape(functools.partial(init_params,
    config), rng)`.
    """
    input_ids = jnp.zeros((1, seq_len), jnp.int32)
    variables = BertForSequenceClassification(config).init(
        {"params": rng}, input_ids, jnp.ones_like(input_ids)
    )
    return variables["params"]


def _init_subtrees(config: BertConfig, seed: int, paths: list[str]) -> dict[str, Any]:
    """Unboxed init values of only the '/'-joined `paths`, equal to `init_params(seed)`'s.

    Under jit XLA drops the random draws for everything not returned, which makes loading
    MiniLM ~4x faster than initialising the 30k x 384 embedding just to overwrite it.
    """

    def init(rng: jax.Array) -> dict[str, Any]:
        params = nn.meta.unbox(init_params(config, rng))
        return {path: layers.get_path(params, path) for path in paths}

    return jax.device_get(jax.jit(init)(jax.random.PRNGKey(seed)))


def load_pretrained(
    model_dir: str | pathlib.Path,
    num_labels: int,
    dtype: str = "float32",
    seed: int = 0,
    lora: peft.LoraConfig | None = None,
    **overrides: Any,
) -> tuple[BertConfig, BertForSequenceClassification, dict[str, Any]]:
    """Builds a classifier from an HF directory (or a name `weights.resolve_model_dir` knows).

    The `bert` subtree comes from safetensors; the classifier head (and the pooler, if the
    checkpoint has none) and the LoRA params (with `lora`) come from init with `seed`. Params
    are unboxed float32 numpy arrays on the host, so the caller decides their placement and
    sharding.
    """
    model_dir = weights.resolve_model_dir(str(model_dir))
    hf_config = weights.read_hf_config(model_dir)
    if hf_config.get("model_type", "bert") != "bert":
        raise ValueError(f"{model_dir} holds model_type {hf_config['model_type']!r}, not 'bert'")
    config = BertConfig.from_hf(
        hf_config, num_labels=num_labels, dtype=dtype, lora=lora, **overrides
    )
    loaded, missing = from_hf(weights.read_safetensors(model_dir), config)
    if missing:
        logging.warning(
            "%s has no weights for %s; keeping freshly initialised values.", model_dir, missing
        )
    params: dict[str, Any] = {"bert": loaded}
    for path, value in _init_subtrees(config, seed, ["classifier", *missing]).items():
        layers.set_path(params, path, value)
    if lora is not None:
        params = peft.add_params(
            params, peft.init_lora_params(functools.partial(init_params, config), seed)
        )
    return config, BertForSequenceClassification(config), params
