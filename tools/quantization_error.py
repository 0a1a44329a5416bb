"""What re-quantizing a GGUF base costs: logits of the float model against NF4, int8, and
the file's own Q4_1 blocks.

  python tools/quantization_error.py [--model=smollm2-135m-instruct] [--prompts=5] \\
      [--json=out.json]

The packaged SmolLM2 is a Q4_1 / Q8_0 GGUF that loading dequantizes to float32 (a). QLoRA
re-quantizes its projections to NF4 (b) or int8 (c), or keeps the file's own Q4_1 blocks (d)
(`peft.quantize=nf4|int8|q4_1` on the family's `quantize_targets`). On the first `--prompts`
GSM8K test problems, each chat-formatted as the gsm8k task does (question + reference
answer), this prints per variant against (a): max and mean |logit difference|, mean
KL(a || variant) per token, top-1 agreement, and the loss on the answer tokens (what the SFT
loss reads). It also counts storage: the file's bits per weight of those projections (Q4_1
blocks: 32 weights, fp16 scale + fp16 min + 16 bytes = 5 bits) against NF4's, int8's and
Q4_1's on the devices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from finetune_jax.data import chat_batches, chat_sources  # noqa: E402
from finetune_jax.hf import gguf_reader, loading, model_files  # noqa: E402
from finetune_jax.models import llama, quantization  # noqa: E402
from finetune_jax.models import lora as lora_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def conversations(data_dir: str, tokenizer, count: int, max_length: int):
    """(ids [N, T], attention mask [N, T], answer mask [N, T]) of the first `count` GSM8K
    test problems, right-padded."""
    records = chat_sources.load_records(data_dir, "gsm8k", split="test", limit=count)
    examples = chat_batches.encode_conversations(records, tokenizer, max_length)
    width = max(len(ids) for ids, _ in examples)
    ids = np.zeros((count, width), np.int32)
    mask, answer = np.zeros_like(ids), np.zeros((count, width), bool)
    for row, (tokens, trained) in enumerate(examples):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        answer[row, : len(tokens)] = trained
    return ids, mask, answer


def logits_of(model: str, quantize: str, ids, mask) -> np.ndarray:
    """float32 logits [N, T, V] of the model loaded with `peft.quantize=quantize` (a LoRA of
    rank 1 whose B is zero, so the adapter changes nothing)."""
    adapter = lora_lib.LoraConfig(
        rank=1,
        targets=r".*/q_proj/kernel",
        quantize=quantize,
        quantize_targets="" if quantize == "none" else llama.FAMILY.quantize_targets,
    )
    _, module, params = loading.load_pretrained(llama.FAMILY, model, "causal_lm", lora=adapter)
    return np.asarray(jax.jit(module.apply)({"params": params}, ids, mask), np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare(reference: np.ndarray, other: np.ndarray, mask, answer, ids) -> dict[str, float]:
    """Differences over the real tokens, and the answer tokens' loss of `other`."""
    real = mask.astype(bool)
    ref_lp, lp = log_softmax(reference), log_softmax(other)
    kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)
    diff = np.abs(reference - other)[real]
    # The loss reads the prediction at t of the token at t + 1 for answer tokens t + 1.
    targets = answer[:, 1:]
    token_lp = np.take_along_axis(lp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "mean_kl_vs_float": float(kl[real].mean()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1))[real].mean()),
        "answer_loss": float(-token_lp[targets].mean()),
    }


def storage_bits(model: str) -> dict[str, float]:
    """Bits per weight of the quantized projections: as the GGUF file stores them, and as
    NF4 / int8 would on the devices."""
    path = model_files.resolve_gguf(model)
    reader = gguf.GGUFReader(path)
    config = gguf_reader.read_gguf_config(path)
    proj = [t for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name]
    weights = sum(int(t.n_elements) for t in proj)
    types = sorted({t.tensor_type.name for t in proj})
    nf4 = int8 = q4_1 = 0.0
    for t in proj:
        out_features, in_features = (int(d) for d in reversed(t.shape))
        shape = (in_features, out_features)
        nf4 += quantization.bits_per_weight("nf4", shape, 1) * t.n_elements
        int8 += quantization.bits_per_weight("int8", shape, 1) * t.n_elements
        q4_1 += quantization.bits_per_weight("q4_1", shape, 1) * t.n_elements
    return {
        "projection_weights": weights,
        "gguf_types": types,
        "gguf_bits_per_weight": 8 * sum(int(t.n_bytes) for t in proj) / weights,
        "nf4_bits_per_weight": nf4 / weights,
        "int8_bits_per_weight": int8 / weights,
        "q4_1_bits_per_weight": q4_1 / weights,
        "layers": config["num_hidden_layers"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "gsm8k"))
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max_length", type=int, default=384)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tokenizer = model_files.load_tokenizer(args.model)
    ids, mask, answer = conversations(args.data_dir, tokenizer, args.prompts, args.max_length)
    reference = logits_of(args.model, "none", ids, mask)
    report = {
        "prompts": args.prompts,
        "tokens": int(mask.sum()),
        "answer_tokens": int(answer[:, 1:].sum()),
        "float": compare(reference, reference, mask, answer, ids),
    }
    for method in ("nf4", "int8", "q4_1"):
        report[method] = compare(
            reference, logits_of(args.model, method, ids, mask), mask, answer, ids
        )
    report["storage"] = storage_bits(args.model)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
