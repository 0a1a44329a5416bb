"""experiments/speech_commands/real_speech.py, the forgetting check: its rows are the real
pytest-audioeval clips (read in place, readable by the speech loader) and its report
aggregates WER / CER per setting with every transcript next to its reference."""

from __future__ import annotations

from pathlib import Path

from experiments.speech_commands import real_speech
from experiments.sweep import Setting, Sweep
from finetune_jax.data import audio_sources


def test_rows_are_the_installed_clips_and_the_speech_loader_reads_them(tmp_path):
    rows = real_speech.audioeval_rows()
    assert len(rows) >= 3 and all(row["text"] for row in rows)
    assert all(Path(row["audio"]).is_file() for row in rows)  # the package's own files
    real_speech.write_split(rows, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["test.jsonl"]  # no audio copied
    loaded = audio_sources.load_rows(str(tmp_path), "test")
    assert [row.text for row in loaded] == [row["text"] for row in rows]
    samples = audio_sources.read_audio(loaded[0].source, 16000)
    assert samples.ndim == 1 and len(samples) > 16000  # over a second of real speech


def test_markdown_reports_mean_and_spread_per_setting_and_every_transcript():
    sweep = Sweep(
        name="speech_commands",
        config="configs/speech/whisper_tiny_commands.py",
        tasks={"speech_commands": {}},
        settings={"zero_shot": Setting(), "lora": Setting()},
        seeds=(0, 1),
    )
    transcript = {"reference": "hello world", "hypothesis": "hello word"}
    results = [
        dict(run="zs", setting="zero_shot", step=0, wer=0.5, cer=0.1, transcripts=[transcript]),
        dict(run="lora0", setting="lora", step=40, wer=0.0, cer=0.0, transcripts=[transcript]),
        dict(run="lora1", setting="lora", step=40, wer=0.2, cer=0.1, transcripts=[transcript]),
    ]
    rows = [{"audio": "a.wav", "text": "hello world"}, {"audio": "b.wav", "text": "one two"}]
    text = real_speech.markdown(sweep, results, rows)
    assert "2 English clips (4 reference words)" in text
    lines = text.splitlines()
    assert "| lora | 0.100 ± 0.141 | 0.050 ± 0.071 | 2 |" in lines
    assert "| zero_shot | 0.500 ± nan | 0.100 ± nan | 1 |" in lines  # one run: no spread
    assert text.count("ref: 'hello world' — hyp: 'hello word'") == 3
