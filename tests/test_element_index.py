"""training/element_index.py: the flat positions that stochastic rounding's random bits and the
frozen-param checksums are computed from."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from finetune_jax.training.element_index import flat_index


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4, 5)])
def test_flat_index_is_the_row_major_position(shape):
    expected = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
    got = jax.jit(flat_index, static_argnums=0)(shape)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, expected)
