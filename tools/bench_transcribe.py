"""Generation speed: seconds of audio transcribed per second of compute, ours vs transformers.

  python tools/bench_transcribe.py --config=configs/speech/whisper_tiny_commands.py \\
      --clips=16 --batch=8 [--repeats=3]

Both sides transcribe the same validation clips of the config's speech task, greedy, from the
same log-mel features (the model's whole window, Whisper's 30 s, which transformers' `generate`
requires, whatever the config says), in batches of --batch, alternating pass by pass in this
process (one sitting, same CPU): ours is the jitted `Transcriber` (warm: compiled on a first
pass that is not timed), theirs `WhisperForConditionalGeneration.generate`
on torch CPU (also warmed on one batch). Reports audio seconds / compute seconds for each, the
ratio, and how many transcripts agree. The model is the config's pretrained model (LoRA off).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.data import audio_features, audio_sources  # noqa: E402
from finetune_jax.hf import model_files  # noqa: E402
from finetune_jax.training import builder  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", None, "A speech config (configs/speech/*.py).")
CLIPS = flags.DEFINE_integer("clips", 32, "Validation clips to transcribe (a fixed subset).")
BATCH = flags.DEFINE_integer("batch", 16, "Clips per generate call, both sides.")
REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed passes over the clips per side, alternating; the best is kept."
)
JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")


def timed_passes(sides, batches, repeats: int) -> list[tuple[float, list[str]]]:
    """For each side (a transcribe function), the fastest of `repeats` passes over `batches`
    (seconds) and its texts. The sides alternate pass by pass, so a change in the machine's
    load during the sitting falls on both."""
    best = [(float("inf"), []) for _ in sides]
    for _ in range(repeats):
        for i, transcribe in enumerate(sides):
            start = time.perf_counter()
            texts = [text for batch in batches for text in transcribe(batch)]
            best[i] = min(best[i], (time.perf_counter() - start, texts), key=lambda x: x[0])
    return best


def bench(config, clips: int, batch_size: int, repeats: int) -> dict:
    """Times ours and transformers' greedy transcription of `clips` validation clips."""
    import torch
    import transformers

    model_dir = model_files.resolve_model_dir(config.model.name)
    extractor = audio_features.load_extractor(model_dir)
    frames = 2 * model_files.read_hf_config(model_dir)["max_source_positions"]
    config.unlock()
    # The model's whole window (Whisper's 30 s): transformers' generate takes nothing shorter.
    config.data.audio_seconds = frames * extractor.hop_length / extractor.sampling_rate
    config.data.max_eval_rows = clips
    config.peft.rank, config.optim.preset = 0, "full"  # the pretrained model as it is
    config.lock()
    setup = builder.build(config)
    params = setup.pretrained_params()
    rows = setup.data.rows("validation")
    features = setup.data.load("validation").features
    rate = extractor.sampling_rate
    audio_s = sum(len(audio_sources.read_audio(row.source, rate)) for row in rows) / rate
    batches = [
        features.take(range(i, min(i + batch_size, len(rows))))
        for i in range(0, len(rows), batch_size)
    ]
    transcriber = setup.scorer.transcriber

    def ours(batch):
        return transcriber.transcribe(params, batch)

    model = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = transformers.WhisperProcessor.from_pretrained(model_dir)

    def theirs(batch):
        with torch.no_grad():
            out = model.generate(torch.from_numpy(batch), max_new_tokens=transcriber.max_new_tokens)
        return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]

    for batch in {b.shape: b for b in batches}.values():  # compile every batch shape
        ours(batch)
    theirs(batches[0])
    (ours_s, ours_texts), (theirs_s, theirs_texts) = timed_passes([ours, theirs], batches, repeats)
    return {
        "clips": len(rows),
        "audio_seconds": round(audio_s, 2),
        "batch": batch_size,
        "window_seconds": config.data.audio_seconds,
        "max_new_tokens": transcriber.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "ours_seconds": round(ours_s, 3),
        "theirs_seconds": round(theirs_s, 3),
        "ours_audio_s_per_s": round(audio_s / ours_s, 2),
        "theirs_audio_s_per_s": round(audio_s / theirs_s, 2),
        "speedup": round(theirs_s / ours_s, 2),
        "same_transcripts": sum(a == b for a, b in zip(ours_texts, theirs_texts, strict=True)),
    }


def main(argv) -> None:
    del argv
    quiet_libraries()
    result = bench(CONFIG.value, CLIPS.value, BATCH.value, REPEATS.value)
    print(json.dumps(result, indent=2))
    if JSON.value:
        Path(JSON.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
