"""The translation path end to end on a tiny random MarianMTModel with the Bergamot tokenizer:
the l10n config (full and LoRA) -> train -> eval with greedy translations scored by chrF /
BLEU -> predict -> export that transformers' MarianMTModel loads and whose beam search gives
ours; the training batches resume exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs.translation.l10n_en_pt_br import get_config as l10n_config
from finetune_jax.eval import run_eval
from finetune_jax.evaluation.seq2seq_generation import Seq2SeqGenerator
from finetune_jax.export import export
from finetune_jax.hf import model_files
from finetune_jax.predict import predict
from finetune_jax.train import train
from finetune_jax.training import builder
from tests.conftest import TINY_MARIAN
from tests.helpers import SHARED_DATA

PAIRS = SHARED_DATA / "l10n_en_pt_br"


@pytest.fixture(scope="module")
def varied_marian_dir(tmp_path_factory):
    """The tiny random Marian (conftest's shape and tokenizer) with one layer each side (half
    the compile time), larger weights (init_std 0.5) and EOS's logit raised by 12: the
    default one writes the same tokens for every input and never stops, which would hide a
    row shuffled between batches; this one translates inputs differently and ends rows at
    different lengths."""
    import torch
    import transformers

    from finetune_jax.hf import marian_conversion

    out_dir = tmp_path_factory.mktemp("varied_marian")
    torch.manual_seed(0)
    shape = {**TINY_MARIAN, "encoder_layers": 1, "decoder_layers": 1, "init_std": 0.5}
    model = transformers.MarianMTModel(transformers.MarianConfig(**shape))
    with torch.no_grad():
        model.final_logits_bias[0, TINY_MARIAN["eos_token_id"]] += 12.0
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_json = model_files.packaged_source("bergamot-tiny-en-pt-br") / "tokenizer.json"
    marian_conversion.write_tokenizer(tokenizer_json, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def l10n_slice(tmp_path_factory):
    """The first 16 train and 8 validation pairs of the shared software messages."""
    out = tmp_path_factory.mktemp("l10n")
    for split, count in (("train", 16), ("validation", 8)):
        lines = (PAIRS / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (out / f"{split}.jsonl").write_text("".join(lines[:count]))
    return out


def tiny_translation_config(model_dir, data_dir, recipe="full"):
    """The l10n config on the tiny model: rows of 32 tokens (one bucket: one compiled shape
    per program), 4 steps of batch 4 without dropout, one eval at the end, 6 new tokens per
    translation."""
    config = l10n_config(recipe)
    config.model.name = str(model_dir)
    config.model.dropout = 0.0
    config.data.dir = str(data_dir)
    config.data.max_length = 32
    config.data.buckets = (32,)
    config.train.batch_size = 4
    config.train.max_steps = 4
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.progress = False
    config.generate.max_new_tokens = 6
    return config


def test_train_eval_predict_and_export(varied_marian_dir, l10n_slice, tmp_path):
    config = tiny_translation_config(varied_marian_dir, l10n_slice)
    straight = tmp_path / "straight"
    summary = train(config, str(straight))
    assert summary["metric"] == "chrf"
    evals = [json.loads(line) for line in open(straight / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [4]
    assert all(e["translated"] == 8 and 0 <= e["chrf"] <= 100 for e in evals)

    # The eval script writes every translation beside its source and reference, in the
    # file's order, and states sacrebleu's signatures.
    result = run_eval(config, str(straight), "validation", which="latest")
    assert result["chrf"] == evals[-1]["chrf"] and result["bleu"] == evals[-1]["bleu"]
    assert result["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
    records = [json.loads(line) for line in open(straight / "translations_validation_step4.jsonl")]
    pairs = [json.loads(line) for line in open(l10n_slice / "validation.jsonl")]
    assert [(r["source"], r["reference"]) for r in records] == [
        (p["en"], p["pt_BR"]) for p in pairs
    ]
    hypotheses = [r["hypothesis"] for r in records]
    assert len(set(hypotheses)) > 1

    # Predict writes the same translation for each row as the eval did.
    out = tmp_path / "translated.jsonl"
    predict(config, str(straight), str(l10n_slice / "validation.jsonl"), str(out), which="latest")
    rows = [json.loads(line) for line in open(out)]
    assert [r["translation"] for r in rows] == hypotheses and rows[0]["en"] == pairs[0]["en"]

    _export_generates_our_tokens(config, straight, tmp_path / "hf")


def _export_generates_our_tokens(config, workdir, out_dir):
    """transformers' MarianMTModel on the export: its beam search gives our beam search's
    tokens (greedy parity is the family's, tests/test_marian.py; the kind adds beams over
    padded text inputs, each beam reading its own input's memory mask) and its tokenizer
    decodes them to our texts."""
    import torch
    import transformers

    export(config, str(workdir), str(out_dir), which="latest")
    model = transformers.MarianMTModel.from_pretrained(out_dir).eval()
    setup = builder.build(config)
    _, params = setup.restore_params(str(workdir), "latest")
    split = setup.data.load("validation")
    inputs = {k: split.rows[k] for k in ("input_ids", "attention_mask")}
    generator = Seq2SeqGenerator(
        setup.module,
        setup.data.generation,
        setup.tokenizer,
        config.generate.max_new_tokens,
        setup.model_config.max_position_embeddings,
        num_beams=3,
    )
    ours = generator.generate(params, inputs)
    with torch.no_grad():
        theirs = model.generate(
            **{k: torch.from_numpy(v).long() for k, v in inputs.items()},
            max_new_tokens=generator.max_new_tokens,
            num_beams=3,
            do_sample=False,
        ).numpy()[:, 1:]  # transformers returns the decoder start token first
    ends = set()
    for row, generated in zip(ours.tolist(), theirs.tolist()):
        row = row[: row.index(generator.eos_id) + 1] if generator.eos_id in row else row
        assert generated[: len(row)] == row
        ends.add(len(row))
    assert len(ends) > 1  # rows stop at different lengths: EOS handling is compared too
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    texts = tokenizer.batch_decode(theirs, skip_special_tokens=True)
    assert generator.texts(ours) == [t.strip() for t in texts]


def test_the_lora_recipe_trains_only_its_adapters(varied_marian_dir, l10n_slice):
    setup = builder.build(tiny_translation_config(varied_marian_dir, l10n_slice, "lora"))
    trained = setup.trainable_paths
    assert trained and all("lora" in path for path in trained)


def test_training_batches_resume_exactly(varied_marian_dir, l10n_slice):
    """What the kind adds to a resume: its batch iterator's saved position gives back the
    batches (order, bucket cuts) the uninterrupted iterator gives; the loop that saves and
    restores it is every kind's (tests/test_train.py)."""
    config = tiny_translation_config(varied_marian_dir, l10n_slice)
    config.data.buckets = (8, 12, 16, 32)
    data = builder.build(config).data
    straight = data.train_batches()
    expected = [next(straight) for _ in range(7)]  # into the second epoch (4 per epoch)
    interrupted = data.train_batches()
    for _ in range(3):
        next(interrupted)
    resumed = data.train_batches()
    resumed.restore(json.loads(json.dumps(interrupted.state())))  # as the checkpoint stores it
    assert len({b["input_ids"].shape[1] for b in expected}) > 1  # several buckets
    for want in expected[3:]:
        got = next(resumed)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
