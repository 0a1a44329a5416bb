"""Where each param of the bert models sits in an HF checkpoint, as `HFMapping` rows (data)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_jax.models.hf_mapping import HFMapping

if TYPE_CHECKING:
    from finetune_jax.models.bert import BertConfig


def hf_mappings(config: BertConfig) -> list[HFMapping]:
    """The HF BertModel tensors (keys without `bert.`) and where they go in our `bert` subtree."""
    d, f, h, k = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.head_dim,
    )

    def embedding(name: str, rows: int) -> HFMapping:
        return HFMapping(
            f"embeddings.{name}.weight", f"embeddings/{name}/embedding", (rows, d), (rows, d)
        )

    def dense(hf: str, ours: str, hf_out: int, hf_in: int, kernel: tuple, bias: tuple) -> list:
        """A torch Linear [out, in] -> our kernel (transposed, heads split) and bias."""
        return [
            HFMapping(f"{hf}.weight", f"{ours}/kernel", (hf_out, hf_in), kernel, True),
            HFMapping(f"{hf}.bias", f"{ours}/bias", (hf_out,), bias),
        ]

    def layer_norm(hf: str, ours: str) -> list[HFMapping]:
        return [
            HFMapping(f"{hf}.weight", f"{ours}/scale", (d,), (d,)),
            HFMapping(f"{hf}.bias", f"{ours}/bias", (d,), (d,)),
        ]

    rows = [
        embedding("word_embeddings", config.vocab_size),
        embedding("position_embeddings", config.max_position_embeddings),
        embedding("token_type_embeddings", config.type_vocab_size),
        *layer_norm("embeddings.LayerNorm", "embeddings/LayerNorm"),
    ]
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        for name in ("query", "key", "value"):
            rows += dense(
                f"{hf}.attention.self.{name}", f"{ours}/attention/{name}", d, d, (d, h, k), (h, k)
            )
        rows += [
            *dense(
                f"{hf}.attention.output.dense", f"{ours}/attention/output", d, d, (h, k, d), (d,)
            ),
            *layer_norm(f"{hf}.attention.output.LayerNorm", f"{ours}/attention/LayerNorm"),
            *dense(f"{hf}.intermediate.dense", f"{ours}/intermediate", f, d, (d, f), (f,)),
            *dense(f"{hf}.output.dense", f"{ours}/output", d, f, (f, d), (d,)),
            *layer_norm(f"{hf}.output.LayerNorm", f"{ours}/output/LayerNorm"),
        ]
    return rows


def pooler_mappings(config: BertConfig) -> list[HFMapping]:
    """The pooler (Dense + tanh on [CLS]) that the sequence head reads; the token head has none."""
    d = config.hidden_size
    return [
        HFMapping("bert.pooler.dense.weight", "bert/pooler/dense/kernel", (d, d), (d, d), True),
        HFMapping("bert.pooler.dense.bias", "bert/pooler/dense/bias", (d,), (d,)),
    ]


def layer_stacks(config: BertConfig) -> dict[str, int]:
    """Stacked layer params of the BERT models (`scan_layers`): stack path -> layer count."""
    return {"bert/encoder/layer": config.num_hidden_layers} if config.scan_layers else {}


def backbone_mappings(config: BertConfig) -> list[HFMapping]:
    """Every param of the `bert` backbone: full paths and full HF keys (one row per layer)."""
    return [
        m._replace(hf_key="bert." + m.hf_key, path="bert/" + m.path) for m in hf_mappings(config)
    ]


def classifier_mappings(config: BertConfig) -> list[HFMapping]:
    """The `classifier` Dense of both heads: a torch Linear [labels, hidden]
    (`BertForTokenClassification`'s whole head)."""
    labels, d = config.num_labels, config.hidden_size
    return [
        HFMapping("classifier.weight", "classifier/kernel", (labels, d), (d, labels), True),
        HFMapping("classifier.bias", "classifier/bias", (labels,), (labels,)),
    ]


def sequence_head_mappings(config: BertConfig) -> list[HFMapping]:
    """`BertForSequenceClassification`'s head: the pooler and the classifier."""
    return pooler_mappings(config) + classifier_mappings(config)
