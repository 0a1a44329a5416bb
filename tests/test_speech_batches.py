"""The speech batch layout (prompt, shift, loss mask), its batches and resume, and WER."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_jax.data import speech_batches
from finetune_jax.data.audio_features import Features
from finetune_jax.evaluation import wer

PROMPT = (50257, 50362)  # Whisper tiny.en: start-of-transcript, no-timestamps
EOS = 50256


def test_prompt_comes_from_the_generation_config():
    generation = {"decoder_start_token_id": 50257, "no_timestamps_token_id": 50362}
    assert speech_batches.decoder_prompt(generation) == PROMPT
    assert speech_batches.decoder_prompt({"decoder_start_token_id": 3}) == (3,)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        speech_batches.decoder_prompt({})


def test_rows_shift_the_target_after_the_prompt_and_train_text_and_eos_only():
    targets = [np.asarray([10, 11, 12, EOS], np.int32), np.asarray([20, EOS], np.int32)]
    rows = speech_batches.target_rows(targets, PROMPT, length=7, pad_id=EOS)
    s, n = PROMPT
    np.testing.assert_array_equal(rows["decoder_input_ids"][0], [s, n, 10, 11, 12, EOS, EOS])
    np.testing.assert_array_equal(rows["labels"][0], [n, 10, 11, 12, EOS, EOS, EOS])
    np.testing.assert_array_equal(rows["weights"][0], [0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows["decoder_attention_mask"][0], [1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows["decoder_input_ids"][1][:3], [s, n, 20])
    np.testing.assert_array_equal(rows["labels"][1][:3], [n, 20, EOS])
    np.testing.assert_array_equal(rows["weights"][1], [0, 1, 1, 0, 0, 0, 0])
    # Teacher forcing: the label at t is the input at t + 1, on every real position.
    real = rows["decoder_attention_mask"][0].astype(bool)
    np.testing.assert_array_equal(
        rows["labels"][0][real][:-1], rows["decoder_input_ids"][0][real][1:]
    )
    # Too long for the row: cut at the end (the EOS is lost, and reported).
    cut = speech_batches.target_rows(targets, PROMPT, length=4, pad_id=EOS)
    np.testing.assert_array_equal(cut["labels"][0], [n, 10, 11, 12])
    assert speech_batches.truncated(targets, PROMPT, 4) == 1


def test_targets_are_tokenized_with_a_leading_space_and_eos(whisper_tiny_en_dir):
    from finetune_jax.hf import model_files

    tokenizer = model_files.load_tokenizer(whisper_tiny_en_dir)
    (ids,) = speech_batches.encode_targets(["turn on the lights "], tokenizer, EOS)
    assert ids[-1] == EOS and ids.dtype == np.int32
    assert tokenizer.decode(ids[:-1]) == " turn on the lights"


def _features(n, frames=6):
    heads = [np.full((2, i % 3), float(i), np.float32) for i in range(n)]
    return Features(heads, np.arange(2 * n, dtype=np.float32).reshape(n, 2), frames)


def test_batches_resume_and_eval_covers_every_row_once():
    targets = [np.asarray([100 + i, EOS], np.int32) for i in range(10)]
    rows = speech_batches.target_rows(targets, PROMPT, 6, EOS)
    features = _features(10)
    batches = speech_batches.SpeechBatches(rows, features, batch_size=4, seed=1)
    first = [next(batches) for _ in range(3)]
    state = batches.state()
    after = [next(batches) for _ in range(2)]
    resumed = speech_batches.SpeechBatches(rows, features, batch_size=4, seed=1)
    resumed.restore(state)
    for a, b in zip(after, [next(resumed) for _ in range(2)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    batch = first[0]
    assert batch["input_features"].shape == (4, 2, 6)
    # Each row's features belong to its target: feature value i <-> token 100 + i.
    for feats, ids in zip(batch["input_features"], batch["decoder_input_ids"]):
        index = ids[2] - 100
        np.testing.assert_array_equal(feats, features.take([index])[0])
    evals = list(speech_batches.eval_batches(rows, features, 4))
    assert len(evals) == 3
    seen = np.concatenate([b["decoder_input_ids"][:, 2] for b in evals])
    weights = np.concatenate([b["weights"].sum(axis=1) for b in evals])
    np.testing.assert_array_equal(seen[weights > 0], 100 + np.arange(10))
    assert (weights[10:] == 0).all() and not evals[-1]["input_features"][2:].any()


def test_wer_normalises_case_and_punctuation():
    assert wer.normalize("Turn ON the lights, please!  What's up?") == (
        "turn on the lights please what's up"
    )
    rates = wer.error_rates(
        ["turn on the lights", "set a timer"], ["Turn on the light.", "set a timer for"]
    )
    # 1 substitution + 1 insertion over 7 reference words.
    assert rates["wer"] == pytest.approx(2 / 7)
    # "lights" -> "light" (1 deletion), " for" (4 insertions); 18 + 11 reference characters.
    assert rates["cer"] == pytest.approx(5 / 29)
    assert wer.error_rates(["..."], ["oh no"])["wer"] == 2.0  # empty reference: insertions
    assert wer.error_rates(["a b"], [""])["wer"] == 1.0
