"""The speech-recognition path end to end on a tiny random Whisper with tiny.en's tokenizer:
config -> train (LoRA) -> eval with greedy transcripts and WER -> exact resume -> export
that transformers' WhisperForConditionalGeneration loads and that generates our tokens."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs.speech.whisper_tiny_commands import get_config as speech_config
from finetune_jax.eval import run_eval
from finetune_jax.export import export
from finetune_jax.train import train
from finetune_jax.training import builder, checkpoints
from tests.helpers import SHARED_DATA, train_losses

CLIPS = SHARED_DATA / "speech_commands_synth"


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """16 train and 8 validation rows of the spoken commands (absolute audio paths)."""
    out = tmp_path_factory.mktemp("commands")
    for split, count in (("train", 16), ("validation", 8)):
        with open(CLIPS / f"{split}.jsonl") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(count))]
        (out / f"{split}.jsonl").write_text(
            "".join(
                json.dumps({"audio": str(CLIPS / r["audio"]), "text": r["text"]}) + "\n"
                for r in rows
            )
        )
    return out


def tiny_speech_config(model_dir, data_dir, cache_dir):
    """The speech config on the tiny model: its 0.64 s window, 4 steps of batch 4, LoRA
    (the config's own targets), selected on a 4-row train holdout, final eval on validation."""
    config = speech_config()
    config.model.name = str(model_dir)
    config.data.dir = str(data_dir)
    config.data.audio_seconds = 0.64
    config.data.cache_dir = str(cache_dir)
    config.data.eval_split = "holdout"
    config.data.holdout_rows = 4
    config.data.max_eval_rows = 0
    config.train.final_split = "validation"
    config.train.batch_size = 4
    config.train.max_steps = 4
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.progress = False
    config.generate.max_new_tokens = 6
    return config


def _state(config, workdir):
    setup = builder.build(config)
    manager = checkpoints.make_manager(str(workdir), 2, None, read_only=True)
    try:
        return jax.device_get(checkpoints.restore_latest(manager, setup.abstract_state())[0])
    finally:
        checkpoints.close(manager)


def test_train_eval_resume_and_export(tiny_whisper_asr_dir, commands, tmp_path):
    config = tiny_speech_config(tiny_whisper_asr_dir, commands, tmp_path / "features")
    straight = tmp_path / "straight"
    summary = train(config, str(straight))
    # Evals reach greedy transcripts: WER selects the checkpoint, and the final eval on
    # validation reports it in summary.json.
    assert summary["metric"] == "wer"
    written = json.loads((straight / "summary.json").read_text())
    final = written["final"]
    assert final["split"] == "validation" and final["transcribed"] == 8
    assert final["wer"] >= 0 and final["cer"] >= 0 and 0 <= final["token_accuracy"] <= 1
    evals = [json.loads(line) for line in open(straight / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert all("wer" in e and e["transcribed"] == 4 for e in evals)

    # The eval script reproduces the final numbers and writes every transcript.
    # (By step: a random model ties on WER, and the manager breaks ties unlike the run.)
    result = run_eval(config, str(straight), "validation", which=str(summary["best_step"]))
    assert result["wer"] == final["wer"] and result["loss"] == pytest.approx(final["loss"])
    lines = (straight / f"eval_validation_step{result['step']}.json").read_text()
    assert json.loads(lines)["wer"] == result["wer"]
    transcripts = [
        json.loads(line)
        for line in open(straight / f"transcripts_validation_step{result['step']}.jsonl")
    ]
    references = [json.loads(line)["text"] for line in open(commands / "validation.jsonl")]
    assert [t["reference"] for t in transcripts] == references

    # Resuming from step 2 ends bitwise where the straight run did; its checkpoint is slim
    # (LoRA), so the resume streams the frozen base again (tests/test_slim_checkpoints.py).
    resumed = tmp_path / "resumed"
    train(config, str(resumed), until_step=2)
    train(config, str(resumed))
    a, b = _state(config, straight), _state(config, resumed)
    assert int(a.step) == int(b.step) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)
    assert train_losses(straight) == train_losses(resumed)

    _export_generates_our_tokens(config, straight, tmp_path / "hf")


def _export_generates_our_tokens(config, workdir, out_dir):
    import torch
    import transformers

    export(config, str(workdir), str(out_dir), which="latest")
    for name in ("preprocessor_config.json", "generation_config.json", "tokenizer.json"):
        assert (out_dir / name).is_file(), name
    model = transformers.WhisperForConditionalGeneration.from_pretrained(out_dir).eval()
    setup = builder.build(config)
    _, params = setup.restore_params(str(workdir), "latest")
    split = setup.data.load("validation")
    features = split.features.take(range(len(split.features)))
    ours = setup.scorer.transcriber.tokens(params, features)
    with torch.no_grad():
        theirs = model.generate(
            torch.from_numpy(features), max_new_tokens=setup.scorer.transcriber.max_new_tokens
        ).numpy()
    # transformers' Whisper generate returns the new tokens only (the prompt stripped):
    # the same greedy tokens as ours, up to each row's EOS (it pads finished rows after it).
    eos = setup.scorer.transcriber.eos_id
    assert theirs.shape[1] == setup.scorer.transcriber.max_new_tokens
    for row, generated in zip(ours.tolist(), theirs.tolist()):
        row = row[: row.index(eos) + 1] if eos in row else row
        assert generated[: len(row)] == row
    # And the same text: the exported processor's decoding of their tokens is our transcript
    # of every validation clip.
    processor = transformers.WhisperProcessor.from_pretrained(out_dir)
    texts = [t.strip() for t in processor.batch_decode(theirs, skip_special_tokens=True)]
    assert texts == setup.scorer.transcriber.texts(ours)
    assert len(texts) == 8 and any(texts)
