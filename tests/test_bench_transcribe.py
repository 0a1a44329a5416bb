"""tools/bench_transcribe.py: ours and transformers' greedy transcripts of the same clips,
timed in one sitting, on the tiny random Whisper with tiny.en's tokenizer."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO
from tests.test_speech_train import commands, tiny_speech_config  # noqa: F401 (fixture)


@pytest.mark.slow  # two models, a compile and featurising: ~60 s on a busy 2-core CPU
def test_bench_times_both_on_the_same_clips(tiny_whisper_asr_dir, commands, tmp_path):  # noqa: F811
    spec = importlib.util.spec_from_file_location("bench_t", REPO / "tools" / "bench_transcribe.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = tiny_speech_config(tiny_whisper_asr_dir, commands, tmp_path)
    config.data.audio_seconds = 30.0  # the tool sets the model's own window (0.64 s here)
    result = tool.bench(config, clips=6, batch_size=4, repeats=1)
    assert result["window_seconds"] == 0.64 and result["clips"] == 6
    assert 6 * 1.0 < result["audio_seconds"] < 6 * 6.0  # the clips' own lengths, not windows
    assert result["same_transcripts"] == 6  # greedy: the same text on both sides
    assert result["ours_audio_s_per_s"] > 0 and result["theirs_audio_s_per_s"] > 0
