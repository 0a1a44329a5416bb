"""The persistent compilation cache: where it lives, and that a second process reads it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from finetune_jax.cluster import compilation_cache

# A program compiled in a fresh process; prints how many persistent-cache hits JAX recorded.
_COMPILE = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from finetune_jax.cluster import compilation_cache
    hits = []
    monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None
    )
    compilation_cache.enable(sys.argv[1], min_compile_seconds=0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    print(float(f(jnp.ones((64, 64)))), len(hits))
    """
)


def _run(directory) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(directory)], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    value, hits = _run(tmp_path)
    assert hits == 0 and any(tmp_path.iterdir()), "the first process writes an entry"
    again, hits = _run(tmp_path)
    assert hits >= 1, "the second process reads it instead of compiling"
    assert again == value


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.cache_dir() == str(compilation_cache.DEFAULT_DIR.expanduser())
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compilation_cache.cache_dir() == str(tmp_path / "jax")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "ours"))
    assert compilation_cache.cache_dir() == str(tmp_path / "ours")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.cache_dir() is None
    assert compilation_cache.enable() is None
