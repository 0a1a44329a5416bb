"""Export round trips: a LoRA-tuned causal LM and a fine-tuned BERT classifier, exported as
HF directories, load in plain transformers and compute what our models compute."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from finetune_jax import train as train_lib
from finetune_jax.data import chat_batches
from finetune_jax.evaluation.lm_generation import Generator, SamplingConfig
from finetune_jax.evaluation.lm_samples import eos_ids, split_prompt
from finetune_jax.export import export, write_hf_model
from finetune_jax.training import builder
from tests.helpers import SHARED_DATA, tiny_config
from tests.test_sft_train import tiny_sft_config


def test_exported_lora_llama_generates_like_ours(tiny_chat_llama_dir, tmp_path):
    config = tiny_sft_config(tiny_chat_llama_dir, **{"train.max_steps": 2})
    workdir, out = tmp_path / "run", tmp_path / "hf"
    train_lib.train(config, str(workdir))
    result = export(config, str(workdir), str(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir would, not mkdtemp's 0700
    for path in out.rglob("*"):  # as open would, not safetensors' 0600
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == config.peft.rank and adapter["task_type"] == "CAUSAL_LM"
    # the base model as transformers resolves it from anywhere: the directory, absolute
    assert adapter["base_model_name_or_path"] == str(tiny_chat_llama_dir.resolve())

    exp = builder.build(config)
    _, params = exp.restore_params(str(workdir))  # base + adapter, unmerged
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt, _ = split_prompt(
        chat_batches.load_records(SHARED_DATA / "gsm8k", split="test", limit=1)[0]
    )
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs_logits = model(torch.tensor([ids])).logits.numpy()
        theirs = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)
    ours_logits = np.asarray(exp.module.apply({"params": params}, np.asarray([ids])))
    np.testing.assert_allclose(ours_logits, theirs_logits, atol=1e-4)

    eos = eos_ids(tokenizer, exp.hf_config)
    generator = Generator(exp.module, eos, tokenizer.pad_token_id, SamplingConfig(20))
    ours = generator.generate(params, [ids], batch_size=1)[0]
    theirs = theirs[0, len(ids) :].tolist()
    assert len(ours) >= 1 and ours == theirs[: len(ours)]
    assert len(ours) == 20 or ours[-1] in eos  # stopped only at an EOS

    with pytest.raises(FileExistsError, match="--overwrite"):
        export(config, str(workdir), str(out))
    assert export(config, str(workdir), str(out), overwrite=True)["step"] == result["step"]


def test_exported_bert_classifier_matches_ours(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice, max_steps=3)
    workdir, out = tmp_path / "run", tmp_path / "hf"
    train_lib.train(config, str(workdir))
    export(config, str(workdir), str(out), which="latest")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "negative", "1": "positive"}

    exp = builder.build(config)
    _, params = exp.restore_params(str(workdir), "3")
    batch = next(exp.data.eval_batches(exp.data.load("validation")))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = np.asarray(exp.module.apply({"params": jax.device_get(params)}, **inputs))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(**{k: torch.tensor(v).long() for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_smollm2_lora_export_generates_like_ours(tmp_path):
    """The real SmolLM2 (from GGUF) with a non-zero adapter: merged export vs ours, 20 greedy
    tokens of a chat prompt (~1 min)."""
    from configs.sft.smollm2_gsm8k_lora import get_config

    config = get_config()
    config.data.dir = str(SHARED_DATA / "gsm8k")
    config.data.max_train_rows = 8
    exp = builder.build(config)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
            if "lora_b" in jax.tree_util.keystr(path)
            else x
        ),
        jax.tree.map(np.asarray, jax.device_get(exp.pretrained_params())),
    )
    out = write_hf_model(exp, params, str(tmp_path / "hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = [{"role": "user", "content": "What is 12 times 7? Answer briefly."}]
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)
    eos = eos_ids(tokenizer, exp.hf_config)
    generator = Generator(exp.module, eos, tokenizer.pad_token_id, SamplingConfig(20))
    ours = generator.generate(params, [ids], batch_size=1)[0]
    assert len(ours) >= 10 and ours == theirs[0, len(ids) :].tolist()[: len(ours)]
