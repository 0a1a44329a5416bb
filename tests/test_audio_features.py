"""Audio input: rows from JSONL / CSV / an HF dataset, decoding and resampling, and log-mel
features equal to transformers' WhisperFeatureExtractor, cached and windowed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

from finetune_jax import progress
from finetune_jax.data import audio_features, audio_sources
from finetune_jax.data.text_sources import DataError
from tests.helpers import SHARED_DATA

CLIPS = SHARED_DATA / "speech_commands_synth"


def _rows(count):
    with open(CLIPS / "validation.jsonl") as f:
        records = [json.loads(line) for line, _ in zip(f, range(count))]
    return [audio_sources.AudioRow(str(CLIPS / r["audio"]), r["text"]) for r in records]


@pytest.fixture(scope="module")
def extractor(whisper_tiny_en_dir):
    return audio_features.load_extractor(whisper_tiny_en_dir)


@pytest.mark.parametrize("seconds", [30.0, 4.0])
def test_features_equal_the_extractor_and_come_back_from_the_cache(
    extractor, seconds, tmp_path, monkeypatch
):
    rows = _rows(3)
    features = audio_features.split_features(rows, extractor, seconds, str(tmp_path))
    samples, frames = audio_features.window_frames(extractor, seconds)
    assert frames == int(seconds * 100)
    for i, row in enumerate(rows):
        audio, rate = soundfile.read(row.source, dtype="float32")
        assert rate == 16000
        expected = extractor(
            audio, sampling_rate=16000, max_length=samples, return_tensors="np"
        ).input_features[0]
        np.testing.assert_array_equal(features.take([i])[0], expected)
        if seconds == 30.0:  # the compact form keeps much less than the 3,000 frames
            assert features.heads[i].shape[1] < 600
    # A second split with the same audio and settings reads the cache, never the audio.
    monkeypatch.setattr(
        audio_features, "read_audio", lambda *a: pytest.fail("features were recomputed")
    )
    again = audio_features.split_features(rows, extractor, seconds, str(tmp_path))
    np.testing.assert_array_equal(again.take([2, -1, 0]), features.take([2, -1, 0]))
    assert not again.take([-1]).any()  # filler row


def test_a_short_window_is_a_prefix_of_the_full_one(extractor, tmp_path):
    rows = _rows(2)  # clips of <= 5.5 s: a 6 s window holds them whole
    full = audio_features.split_features(rows, extractor, 30.0, str(tmp_path)).take([0, 1])
    short = audio_features.split_features(rows, extractor, 6.0, str(tmp_path)).take([0, 1])
    np.testing.assert_array_equal(short, full[:, :, :600])


def test_resampling_keeps_the_tone_and_rate(tmp_path):
    rate, seconds, tone = 44100, 0.5, 440.0
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack([np.sin(2 * np.pi * tone * t)] * 2, axis=1).astype(np.float32) * 0.5
    path = tmp_path / "tone.wav"
    soundfile.write(path, stereo, rate)
    audio = audio_sources.read_audio(str(path), 16000)
    assert audio.dtype == np.float32 and audio.shape == (8000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * 16000 / len(audio) == pytest.approx(tone, abs=2.0)
    # Band-limited: a 7 kHz tone at 44.1 kHz does not alias into the 8 kHz-Nyquist band
    # as a 9 kHz tone would (folded to 7 kHz); its energy survives at 7 kHz, unattenuated.
    high = audio_sources.resample(np.sin(2 * np.pi * 7000 * t).astype(np.float32), rate, 16000)
    spectrum = np.abs(np.fft.rfft(high[1000:-1000]))
    assert np.argmax(spectrum) * 16000 / len(high[1000:-1000]) == pytest.approx(7000, abs=5)
    folded = audio_sources.resample(np.sin(2 * np.pi * 9000 * t).astype(np.float32), rate, 16000)
    assert np.sqrt(np.mean(folded[1000:-1000] ** 2)) < 0.01  # removed, not folded back
    same = np.ones(5, np.float32)
    np.testing.assert_array_equal(audio_sources.resample(same, 16000, 16000), same)


def test_rows_from_jsonl_csv_and_a_dataset(tmp_path):
    import datasets

    rows = _rows(3)
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"audio": r.source, "text": r.text}) + "\n" for r in rows)
    )
    # Relative paths in a CSV are relative to the file.
    (tmp_path / "clips").symlink_to(CLIPS / "validation")
    csv_lines = ["audio,text"] + [f"clips/{r.source.rsplit('/', 1)[1]},{r.text}" for r in rows]
    (tmp_path / "validation.csv").write_text("\n".join(csv_lines) + "\n")
    assert audio_sources.load_rows(str(tmp_path), "train") == rows
    from_csv = audio_sources.load_rows(str(tmp_path), "validation")
    assert [r.text for r in from_csv] == [r.text for r in rows]
    assert all(r.source.startswith(str(tmp_path / "clips")) for r in from_csv)
    # An HF dataset with an Audio column (a local one: there is no network here), read
    # undecoded and decoded by soundfile like a file.
    table = datasets.Dataset.from_dict(
        {"speech": [r.source for r in rows], "sentence": [r.text for r in rows]}
    ).cast_column("speech", datasets.Audio())
    table = table.cast_column("speech", datasets.Audio(decode=False))
    table = table.map(lambda x: {"speech": {"bytes": open(x["speech"]["path"], "rb").read()}})
    table.to_parquet(str(tmp_path / "hub" / "data" / "test-00000.parquet"))
    hub = audio_sources.load_rows(
        "",
        "test",
        hub_dataset=str(tmp_path / "hub"),
        audio_column="speech",
        text_column="sentence",
    )
    assert [r.text for r in hub] == [r.text for r in rows]
    assert all(isinstance(r.source, bytes) for r in hub)
    np.testing.assert_array_equal(
        audio_sources.read_audio(hub[0].source, 16000),
        audio_sources.read_audio(rows[0].source, 16000),
    )
    with pytest.raises(DataError, match="has no column 'audio'"):
        audio_sources.load_rows("", "test", hub_dataset=str(tmp_path / "hub"))


def test_errors_name_the_culprit(tmp_path, extractor):
    with pytest.raises(DataError, match="no train.jsonl or train.csv"):
        audio_sources.load_rows(str(tmp_path), "train")
    (tmp_path / "train.jsonl").write_text('{"audio": "a.flac"}\n')
    with pytest.raises(DataError, match=r"line 1: missing column\(s\) \['text'\]"):
        audio_sources.load_rows(str(tmp_path), "train")
    with pytest.raises(DataError, match="a.flac' does not exist"):
        audio_sources.read_audio(str(tmp_path / "a.flac"), 16000)
    with pytest.raises(DataError, match="no preprocessor_config.json"):
        audio_features.load_extractor(tmp_path)


def test_computing_features_shows_progress_and_a_cache_hit_is_quiet(
    extractor, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a progress line after every clip
    rows = _rows(3)
    audio_features.split_features(rows, extractor, 4.0, str(tmp_path), label="validation")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("computing audio features of validation (3 clips) into ")
    assert [line.split(" (")[0] for line in err[1:4]] == [
        f"audio features of validation: {i}/3 clips" for i in (1, 2, 3)
    ]
    assert err[4].startswith("computed audio features of validation in ") and len(err) == 5
    audio_features.split_features(rows, extractor, 4.0, str(tmp_path), label="validation")
    assert capsys.readouterr().err == ""
