"""Where each param of the llama models sits in an HF checkpoint, as `HFMapping` rows (data)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_jax.models.hf_mapping import HFMapping

if TYPE_CHECKING:
    from finetune_jax.models.llama import LlamaConfig


def hf_mappings(config: LlamaConfig) -> list[HFMapping]:
    """HF tensors (keys without `model.`) and where they go in our `model` subtree."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rows = [HFMapping("embed_tokens.weight", "embed_tokens/embedding", (v, d), (v, d))]
    for i in range(config.num_hidden_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            key, path = f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}"
            rows.append(
                HFMapping(f"{key}.weight", f"{path}/kernel", (heads * h, d), (d, heads, h), True)
            )
            if config.attention_bias:
                rows.append(HFMapping(f"{key}.bias", f"{path}/bias", (heads * h,), (heads, h)))
        rows.append(
            HFMapping(
                f"{hf}.self_attn.o_proj.weight",
                f"{ours}/self_attn/o_proj/kernel",
                (d, n * h),
                (n, h, d),
                True,
            )
        )
        if config.o_proj_bias:
            rows.append(
                HFMapping(
                    f"{hf}.self_attn.o_proj.bias", f"{ours}/self_attn/o_proj/bias", (d,), (d,)
                )
            )
        for name, out, inp in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
            key, path = f"{hf}.mlp.{name}", f"{ours}/mlp/{name}"
            rows.append(HFMapping(f"{key}.weight", f"{path}/kernel", (out, inp), (inp, out), True))
            if config.mlp_bias:
                rows.append(HFMapping(f"{key}.bias", f"{path}/bias", (out,), (out,)))
        for name in ("input_layernorm", "post_attention_layernorm"):
            rows.append(HFMapping(f"{hf}.{name}.weight", f"{ours}/{name}/scale", (d,), (d,)))
    rows.append(HFMapping("norm.weight", "norm/scale", (d,), (d,)))
    return rows


def _head_mapping(config: LlamaConfig) -> list[HFMapping]:
    if config.tie_word_embeddings:
        return []
    shape = (config.vocab_size, config.hidden_size)
    return [HFMapping("weight", "kernel", shape, shape[::-1], True)]


def layer_stacks(config: LlamaConfig) -> dict[str, int]:
    """Stacked layer params of LlamaForCausalLM (`scan_layers`): stack path -> layer count."""
    return {"model/layers": config.num_hidden_layers} if config.scan_layers else {}


def backbone_mappings(config: LlamaConfig) -> list[HFMapping]:
    """Every param of the `model` backbone: full paths and full HF keys (one row per layer)."""
    return [
        m._replace(hf_key="model." + m.hf_key, path="model/" + m.path) for m in hf_mappings(config)
    ]


def lm_head_mappings(config: LlamaConfig) -> list[HFMapping]:
    """The causal-LM head (`lm_head`; none when tied to the token embedding)."""
    head = _head_mapping(config)
    return [m._replace(hf_key="lm_head." + m.hf_key, path="lm_head/" + m.path) for m in head]
