"""Host memory and time of quantizing one kernel (the loader's step for each QLoRA tensor):
numpy's peak allocation beyond the float input, per weight, chunked (as the loader does) and
whole.

  python tools/quantize_memory.py [--shape 4096,14336] [--methods nf4,int8,q4_1]

`tracemalloc` sees numpy's allocations; the float kernel itself is allocated before tracing
starts, so the figure is what quantizing adds.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.models import quantization  # noqa: E402


def measure(method: str, kernel: np.ndarray, chunk_weights: int) -> tuple[float, float]:
    """(peak bytes per weight beyond the input, seconds) of one `quantization.quantize`."""
    default, quantization.HOST_CHUNK_WEIGHTS = quantization.HOST_CHUNK_WEIGHTS, chunk_weights
    tracemalloc.start()
    try:
        start = time.perf_counter()
        quantization.quantize(method, kernel, 1)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        quantization.HOST_CHUNK_WEIGHTS = default
    return peak / kernel.size, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096,14336", help="fan-in,fan-out of the kernel")
    ap.add_argument("--methods", default="nf4,int8,q4_1")
    args = ap.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    kernel = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    print(f"kernel {shape}, {kernel.size:,} weights; chunk {quantization.HOST_CHUNK_WEIGHTS:,}")
    print("| method | chunked B/weight | chunked s | whole B/weight | whole s |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        chunked = measure(method, kernel, quantization.HOST_CHUNK_WEIGHTS)
        whole = measure(method, kernel, kernel.size)
        print(
            f"| {method} | {chunked[0]:.2f} | {chunked[1]:.2f} | {whole[0]:.2f} | {whole[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
