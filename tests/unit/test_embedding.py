"""sam.types.Embedding: float16 <-> float32 conversion of every array, exactly as numpy converts."""
from __future__ import annotations

import numpy as np

from sam_backend.sam.types import Embedding, convert


def awkward(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    """Values across float16's whole range, with inf, nan, subnormals and values that round either way."""
    values = np.random.default_rng(seed).standard_normal(shape) * np.float64(10.0) ** np.random.default_rng(
        seed + 1).integers(-9, 6, shape)
    flat = values.reshape(-1)
    flat[:6] = [np.inf, -np.inf, np.nan, 6e-8, -0.0, 65519.0]
    with np.errstate(over="ignore"):  # beyond float16's range: inf, as intended
        return values.astype(dtype)


def test_conversion_is_numpys_both_ways_also_for_non_contiguous_arrays():
    half = awkward((1, 256, 64, 64), np.float16)
    for array in (half, half[:, :, ::2], half[0, :3]):
        out = convert(array, np.float32)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == array.shape
        assert np.array_equal(out, array.astype(np.float32), equal_nan=True)
    single = awkward((1, 64, 128, 128), np.float32, seed=3)
    with np.errstate(over="ignore"):
        expected = single.astype(np.float16)
    out = convert(single, np.float16)
    assert out.dtype == np.float16 and np.array_equal(out, expected, equal_nan=True)
    assert convert(np.zeros((0, 4), np.float16), np.float32).shape == (0, 4)


def test_an_embedding_converts_every_array_and_keeps_its_geometry():
    embedding = Embedding(awkward((1, 256, 64, 64), np.float16), (480, 640), (768, 1024),
                          extras={"high_res_0": awkward((1, 32, 256, 256), np.float16, seed=5)})
    single = embedding.astype(np.float32)
    assert single.original_size == (480, 640) and single.input_size == (768, 1024)
    for name, array in embedding.arrays().items():
        assert np.array_equal(single.arrays()[name], array.astype(np.float32), equal_nan=True), name
    assert single.astype(np.float32) is single
