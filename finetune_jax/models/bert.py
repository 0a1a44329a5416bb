"""BERT encoder (HF `model_type == "bert"`): config and Flax linen modules.

Param names mirror HF (`LayerNorm`, `intermediate`, `output`) so the mapping in `bert_hf.py`
is easy to audit; every param carries logical axis names so sharding is decided by a rules table.
Parity with `transformers.BertModel` is checked in tests/test_bert.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import attention, bert_hf, layers, prompt_tuning
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import HeadSpec, ModelFamily

# Activations are constrained to these logical axes at block boundaries.
ACTIVATION_AXES = ("batch", "length", "activation_embed")
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
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the params (bfloat16 halves their memory)
    remat: str = "none"  # none | full | dots_saveable (see layers.remat)
    lora: lora_lib.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match
    scan_layers: bool = False  # one nn.scan over params stacked along a `layers` axis

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


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout.

    Under prompt tuning the virtual tokens (`prompt_embeddings`, here) come before the word
    embeddings, at positions 0..n-1 with token type 0, as HF PEFT feeds them to BertModel.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids_BL, token_type_ids_BL, deterministic: bool = True):
        cfg = self.config
        virtual = prompt_tuning.virtual_tokens(cfg.lora)

        def embed(num: int, axis: str, name: str) -> nn.Embed:
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                embedding_init=layers.normal_init(cfg.initializer_range, (axis, "embed")),
                name=name,
            )

        words_BLD = embed(cfg.vocab_size, "vocab", "word_embeddings")(input_ids_BL)
        if virtual:
            words_BLD, token_type_ids_BL = prompt_tuning.encoder_inputs(
                self, cfg, words_BLD, token_type_ids_BL
            )
        positions_1L = jnp.arange(words_BLD.shape[1])[None, :]
        x_BLD = (
            words_BLD
            + embed(cfg.max_position_embeddings, "position", "position_embeddings")(positions_1L)
            + embed(cfg.type_vocab_size, "token_type", "token_type_embeddings")(token_type_ids_BL)
        )
        x_BLD = layers.layer_norm(cfg, "LayerNorm")(x_BLD)
        return layers.Dropout(cfg.hidden_dropout_prob)(x_BLD, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention + output projection + residual LayerNorm (HF BertAttention).

    `queries` > 0 computes the outputs of the first `queries` positions only (all keys);
    0: every position.
    """

    config: BertConfig
    queries: int = 0

    @nn.compact
    def __call__(self, x_BLD, mask_bias_B11L, deterministic: bool = True):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name: str, x) -> jax.Array:
            return layers.DenseND(
                features=(heads, head_dim),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=layers.normal_init(cfg.initializer_range, ("embed", "heads", "kv")),
                bias_init=layers.zeros_init(("heads", "kv")),
                lora=cfg.lora,
                name=name,
            )(x, deterministic)

        x_BQD = x_BLD[:, : self.queries] if self.queries else x_BLD
        # Scale q (L*D values) rather than the scores (L*L*H values); same maths.
        q_BLHK = project("query", x_BQD) * jnp.asarray(head_dim**-0.5, cfg.dtype)
        k_BLHK, v_BLHK = project("key", x_BLD), project("value", x_BLD)
        scores_BHLL = jnp.einsum("bqhd,bkhd->bhqk", q_BLHK, k_BLHK)
        # Softmax in float32 whatever the compute dtype: bf16 exp/sum loses too much.
        probs_BHLL = jax.nn.softmax(scores_BHLL.astype(jnp.float32) + mask_bias_B11L, axis=-1)
        probs_BHLL = layers.Dropout(cfg.attention_probs_dropout_prob)(
            probs_BHLL, deterministic=deterministic
        ).astype(cfg.dtype)
        context_BLHK = jnp.einsum("bhqk,bkhd->bqhd", probs_BHLL, v_BLHK)
        out_BLD = layers.DenseND(
            features=(cfg.hidden_size,),
            in_axes=2,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=layers.normal_init(cfg.initializer_range, ("heads", "kv", "embed")),
            bias_init=layers.zeros_init(("embed",)),
            lora=cfg.lora,
            name="output",
        )(context_BLHK, deterministic)
        out_BLD = layers.Dropout(cfg.hidden_dropout_prob)(out_BLD, deterministic=deterministic)
        return layers.layer_norm(cfg, "LayerNorm")(out_BLD + x_BQD)


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
            param_dtype=cfg.param_dtype,
            kernel_init=layers.normal_init(cfg.initializer_range, ("mlp", "embed")),
            bias_init=layers.zeros_init(("embed",)),
            lora=cfg.lora,
            name="dense",
        )
        nn.share_scope(self, dense)
        out_BLD = dense(h_BLF, deterministic)
        out_BLD = layers.Dropout(cfg.hidden_dropout_prob)(out_BLD, deterministic=deterministic)
        return layers.layer_norm(cfg, "LayerNorm")(out_BLD + residual_BLD)


class BertLayer(nn.Module):
    """One transformer block: attention, then the GELU MLP (of the first `queries`
    positions only when > 0, see BertSelfAttention)."""

    config: BertConfig
    queries: int = 0

    @nn.compact
    def __call__(self, x_BLD, mask_bias_B11L, deterministic: bool = True):
        cfg = self.config
        x_BLD = BertSelfAttention(cfg, self.queries, name="attention")(
            x_BLD, mask_bias_B11L, deterministic
        )
        h_BLF = layers.DenseND(
            features=(cfg.intermediate_size,),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=layers.normal_init(cfg.initializer_range, ("embed", "mlp")),
            bias_init=layers.zeros_init(("mlp",)),
            lora=cfg.lora,
            name="intermediate",
        )(x_BLD, deterministic)
        h_BLF = layers.get_activation(cfg.hidden_act)(h_BLF)
        x_BLD = BertOutput(cfg, name="output")(h_BLF, x_BLD, deterministic)
        return nn.with_logical_constraint(x_BLD, ACTIVATION_AXES)


class BertEncoder(nn.Module):
    """The stack of `layer_{i}` blocks; returns the last hidden state [B, L, D].

    With `scan_layers`, one `nn.scan` over a single `layer` block whose params are stacked
    along a leading `layers` axis: one layer in the program whatever the depth.
    `first_token_only`: the caller reads the [CLS] position alone, so the last (unrolled)
    layer computes that position only and the result is [B, 1, D]: the same values, a sixth
    fewer FLOPs in a 6-layer classifier's step.
    """

    config: BertConfig
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x_BLD, attention_mask_BL, deterministic: bool = True):
        mask_bias_B11L = attention.additive_attention_mask(attention_mask_BL)
        x_BLD = layers.encoder_stack(
            self.scope.path,
            BertLayer,
            self.config,
            x_BLD,
            mask_bias_B11L,
            deterministic,
            last_layer={"queries": 1} if self.first_token_only else None,
        )
        return x_BLD[:, :1] if self.first_token_only else x_BLD


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
                param_dtype=cfg.param_dtype,
                kernel_init=layers.normal_init(cfg.initializer_range, ("embed", "mlp")),
                bias_init=layers.zeros_init(("mlp",)),
                name="dense",
            )(x_BLD[:, 0])
        )


class BertModel(nn.Module):
    """Embeddings + encoder + pooler; returns (last_hidden_state [B,L,D], pooled [B,D]).

    `pooled_only`: only `pooled` is used; last_hidden_state is then the [CLS] row [B,1,D]
    (see BertEncoder.first_token_only). `with_pooler=False`: no pooler (pooled is None),
    as transformers' `add_pooling_layer=False`. Under prompt tuning the pooler reads
    position 0, the first virtual token (as under HF PEFT), and last_hidden_state holds the
    real tokens only.
    """

    config: BertConfig
    pooled_only: bool = False
    with_pooler: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        virtual = prompt_tuning.virtual_tokens(self.config.lora)
        attention_mask = prompt_tuning.extend(attention_mask, virtual, 1)
        x_BLD = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        x_BLD = nn.with_logical_constraint(x_BLD, ACTIVATION_AXES)
        x_BLD = BertEncoder(self.config, self.pooled_only, name="encoder")(
            x_BLD, attention_mask, deterministic
        )
        hidden_BLD = x_BLD if self.pooled_only else prompt_tuning.drop_virtual(x_BLD, virtual)
        if not self.with_pooler:
            return hidden_BLD, None
        return hidden_BLD, BertPooler(self.config, name="pooler")(x_BLD)


def _classify(module: nn.Module, cfg: BertConfig, features, deterministic: bool):
    """Both heads' end: float32 features (sown as `intermediates/features` for drift
    monitoring: apply(..., mutable="intermediates")), dropout, the `classifier` Dense."""
    features = features.astype(jnp.float32)
    module.sow("intermediates", "features", features)
    rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    features = layers.Dropout(rate)(features, deterministic=deterministic)
    return layers.classifier(cfg.num_labels, cfg.param_dtype, cfg.initializer_range)(features)


class BertForSequenceClassification(nn.Module):
    """BertModel + dropout + `classifier` Dense; returns float32 logits [B, num_labels]."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg = self.config
        _, pooled_BD = BertModel(cfg, pooled_only=True, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        return _classify(self, cfg, pooled_BD, deterministic)


class BertForTokenClassification(nn.Module):
    """BertModel + dropout + `classifier` Dense on every position; returns float32 logits
    [B, L, num_labels]. The pooler is not computed (transformers' token model has none)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg = self.config
        hidden_BLD, _ = BertModel(cfg, with_pooler=False, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        return _classify(self, cfg, hidden_BLD, deterministic)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("seq_len", "head"))
def init_params(
    config: BertConfig, rng: jax.Array, seq_len: int = 8, head: type = None
) -> dict[str, Any]:
    """Initialises `head` (default BertForSequenceClassification); returns the boxed
    (nn.Partitioned) params.

    Jitted (config is static) because eager init dispatches hundreds of tiny ops. For shapes
    and logical names without allocating: `jax.eval_shape(functools.partial(init_params,
    config), rng)`.
    """
    input_ids = jnp.zeros((1, seq_len), jnp.int32)
    variables = (head or BertForSequenceClassification)(config).init(
        {"params": rng}, input_ids, jnp.ones_like(input_ids)
    )
    return variables["params"]


# The classifier and pooler, new or trained in the `lora` preset, go along whole.
_SEQUENCE_HEAD = HeadSpec(
    module=BertForSequenceClassification,
    hf_rows=bert_hf.sequence_head_mappings,
    new_params=("classifier",),
    bias=HEAD_BIAS,
    hf_class_suffix="ForSequenceClassification",
    peft_task_type="SEQ_CLS",
    modules_to_save=("classifier", "bert/pooler"),
    trained=r"(classifier|bert/pooler)/.*",
)

FAMILY = ModelFamily(
    name="bert",
    model_types=("bert",),
    config_from_hf=BertConfig.from_hf,
    heads={
        "text_classification": _SEQUENCE_HEAD,
        "token_classification": dataclasses.replace(
            _SEQUENCE_HEAD,
            module=BertForTokenClassification,
            hf_rows=bert_hf.classifier_mappings,
            hf_class_suffix="ForTokenClassification",
            peft_task_type="TOKEN_CLS",
            modules_to_save=("classifier",),
            trained=r"classifier/.*",
        ),
    },
    init=lambda head, config, rng: init_params(config, rng, head=head),
    backbone_mappings=bert_hf.backbone_mappings,
    layer_stacks=bert_hf.layer_stacks,
    layer_pattern=r".*/layer_(\d+)/.*",
    lora_targets=r".*/attention/(query|value)/kernel",
    # HF PEFT's "output.dense" names both the attention output and the FFN output.
    ia3_targets=r".*/attention/(key|value)/kernel|.*/output/kernel",
    ia3_feedforward=r".*/output/kernel",
    # Every attention and FFN projection of the encoder layers (not the pooler or a head).
    quantize_targets=r".*/layer_\d+/(attention/(query|key|value|output)|intermediate|output)/kernel",
    word_embeddings="bert/embeddings/word_embeddings/embedding",
    dropout_keys=("hidden_dropout_prob", "attention_probs_dropout_prob"),
    optional_params=("bert/pooler",),  # some checkpoints drop the pooler
    bare_prefix="bert.",  # a bare BertModel checkpoint names its tensors without it
    hf_class_names={"bert": "Bert"},
)
