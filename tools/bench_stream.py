"""Streaming text input at scale: token-cache build vs hit, time to first step, host RSS.

  python tools/bench_stream.py --rows=100000,1000000 [--json=out.json]

For each row count N, writes a synthetic SST-2-style TSV (N train rows of 4-40 random words
from the tokenizer's vocabulary, random 0/1 labels; 2,000 dev rows) into a temporary
directory, then measures, each in a fresh process (so peak RSS is that phase's own):
  cache cold   tokenize train and dev into an empty token cache (data/token_cache.py)
  cache warm   open both again: a cache hit
  pipeline     open the cached train split and take 20 batches through the Grain iterator
               (what a run does before its first step, without JAX's compile noise)
  train        `python -m finetune_jax.train` with configs/glue/sst2_minilm.py (the packaged
               MiniLM, batch 32, max length 64) for 3 steps on the cached data: time from
               process start to the first step done, and the run's peak RSS
The point is the RSS columns: building holds one chunk, not the split, and a reading process
keeps ~24 bytes per row (offsets, labels, lengths, the epoch's permutation) plus its batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "glue" / "sst2_minilm.py"
DEV_ROWS = 2_000


def _tokenizer(model: str):
    import transformers  # noqa: PLC0415

    from finetune_jax.hf import model_files  # noqa: PLC0415

    return transformers.AutoTokenizer.from_pretrained(model_files.resolve_model_dir(model))


def write_tsv(path: Path, rows: int, words: np.ndarray, seed: int) -> None:
    """`rows` lines of "sentence<TAB>label" under a header, written 100k rows at a time."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for start in range(0, rows, 100_000):
            count = min(100_000, rows - start)
            lengths = rng.integers(4, 41, count)
            picks = rng.integers(0, len(words), lengths.sum())
            labels = rng.integers(0, 2, count)
            ends = np.cumsum(lengths)
            lines = (
                " ".join(words[picks[end - n : end]]) + f"\t{label}\n"
                for n, end, label in zip(lengths, ends, labels)
            )
            f.writelines(lines)


def vocabulary_words(model: str) -> np.ndarray:
    """Whole words of the tokenizer's vocabulary (no sub-word pieces or specials)."""
    vocab = _tokenizer(model).get_vocab()
    return np.asarray(sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2))


def cache_phase(data_dir: str, cache_dir: str, model: str) -> dict:
    """Open (building if missing) the train and dev token caches; seconds and peak RSS."""
    from finetune_jax.data import token_cache  # noqa: PLC0415
    from finetune_jax.data.text_tasks import TASKS  # noqa: PLC0415

    tokenizer = _tokenizer(model)
    start = time.perf_counter()
    rows = 0
    for split in ("train", "validation"):
        rows += len(
            token_cache.open_split(TASKS["sst2"], data_dir, split, tokenizer, 64, cache_dir)
        )
    return {
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def pipeline_phase(data_dir: str, cache_dir: str, model: str) -> dict:
    """Open the cached train split and take 20 batches of 32 through the Grain iterator, as
    a run does before its first step; seconds and peak RSS, without JAX compilation noise."""
    from finetune_jax.data import grain_batches, token_cache  # noqa: PLC0415
    from finetune_jax.data.text_tasks import TASKS  # noqa: PLC0415

    tokenizer = _tokenizer(model)
    start = time.perf_counter()
    split = token_cache.open_split(TASKS["sst2"], data_dir, "train", tokenizer, 64, cache_dir)
    batches = grain_batches.GrainTrainBatches(split, 32, 0, (16, 24, 32, 40, 48, 64), 0)
    first = next(batches)
    first_s = time.perf_counter() - start
    for _ in range(19):
        next(batches)
    return {
        "first_batch_s": first_s,
        "seconds": time.perf_counter() - start,
        "rows": len(first["labels"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_phase(args: list[str]) -> dict:
    """This script's `--phase` in a fresh process; its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_phase(data_dir: str, cache_dir: str, workdir: str, model: str) -> dict:
    """3 train steps in a fresh process; time to first step and peak RSS from its summary."""
    command = [
        sys.executable, "-m", "finetune_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
        f"--config.model.name={model}", f"--config.data.dir={data_dir}",
        f"--config.data.cache_dir={cache_dir}", "--config.train.max_steps=3",
        "--config.train.eval_every=3", "--config.train.progress=False",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    summary = json.loads((Path(workdir) / "summary.json").read_text())
    return {
        "first_step_s": summary["first_step_s"],
        "peak_rss_mb": summary["peak_host_rss_bytes"] / 2**20,
        "compiled_train_shapes": summary["compiled_train_shapes"],  # each compile costs RSS
    }


def bench(rows: int, model: str, words: np.ndarray) -> dict:
    """Every phase for one row count, in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        data, cache = Path(tmp) / "data", str(Path(tmp) / "cache")
        data.mkdir()
        start = time.perf_counter()
        write_tsv(data / "train.tsv", rows, words, seed=rows)
        write_tsv(data / "dev.tsv", DEV_ROWS, words, seed=-1 % 2**32)
        result = {
            "rows": rows,
            "file_mb": (data / "train.tsv").stat().st_size / 2**20,
            "write_s": time.perf_counter() - start,
        }
        phase = ["--phase=cache", f"--data={data}", f"--cache={cache}", f"--model={model}"]
        result["cache_cold"] = run_phase(phase)
        result["cache_warm"] = run_phase(phase)
        result["pipeline"] = run_phase([*phase[1:], "--phase=pipeline"])
        result["train"] = train_phase(str(data), cache, str(Path(tmp) / "run"), model)
        return result


def table(results: list[dict]) -> str:
    lines = [
        "| rows | TSV MB | cache build s | build peak RSS MB | cache hit s | hit peak RSS MB "
        "| first batch s | pipeline peak RSS MB | first step s (warm cache) | train peak RSS MB "
        "| train shapes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cold, warm, train, pipe = (r[k] for k in ("cache_cold", "cache_warm", "train", "pipeline"))
        lines.append(
            f"| {r['rows']:,} | {r['file_mb']:.0f} | {cold['seconds']:.1f} | "
            f"{cold['peak_rss_mb']:.0f} | {warm['seconds']:.2f} | {warm['peak_rss_mb']:.0f} | "
            f"{pipe['first_batch_s']:.2f} | {pipe['peak_rss_mb']:.0f} | "
            f"{train['first_step_s']:.1f} | {train['peak_rss_mb']:.0f} | "
            f"{train['compiled_train_shapes']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated row counts")
    parser.add_argument("--model", default="all-minilm-l6-v2", help="model (and tokenizer)")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)  # internal: one phase
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase = {"cache": cache_phase, "pipeline": pipeline_phase}[args.phase]
        print(json.dumps(phase(args.data, args.cache, args.model)))
        return
    words = vocabulary_words(args.model)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        results.append(bench(rows, args.model, words))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
