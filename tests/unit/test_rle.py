"""rle.encode/decode against the Label Studio SDK's brush RLE (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from sam_backend.encoding import rle

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def sdk_encode(mask: np.ndarray) -> list[int]:
    """The SDK's encoding of a bool (-> 0/255) or uint8 mask."""
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * np.uint8(255)
    return mask2rle(mask)


def as_uint8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255) if mask.dtype == np.bool_ else mask


def sdk_bit_length(values: np.ndarray) -> int:
    """Unpadded bit length of encode_rle(values), counted independently."""
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [values.size]]))
    bits = 53
    for n in runs.tolist():
        if n <= 8:
            bits += 14
        elif n <= 16:
            bits += 15
        elif n <= 256:
            bits += 19
        else:
            bits += 27 * ((n - 1) // 65536 + 1)
    return bits


def check_mask(mask: np.ndarray) -> list[int]:
    """encode == SDK, SDK padding rule, decode and SDK decode_rle round-trip."""
    h, w = mask.shape
    ours = rle.encode(mask)
    assert ours == sdk_encode(mask)
    assert all(type(b) is int for b in ours)
    expected = as_uint8(mask)
    bits = sdk_bit_length(np.repeat(expected.ravel(), 4))
    assert len(ours) == bits // 8 + 1  # 8 - bits % 8 padding bits, 1..8
    back = rle.decode(ours, h, w)
    assert back.dtype == np.uint8 and back.shape == (h, w)
    np.testing.assert_array_equal(back, expected)
    rgba = decode_rle(ours).reshape(h, w, 4)
    np.testing.assert_array_equal(rgba, np.repeat(expected[:, :, None], 4, axis=2))
    return ours


@st.composite
def masks(draw, max_side: int = 64) -> np.ndarray:
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "blobs", "rects", "stripes"]))
    if kind == "noise":
        m = rng.random((h, w)) < draw(st.floats(0.0, 1.0))
    elif kind == "blobs":
        yy, xx = np.mgrid[:h, :w]
        m = np.zeros((h, w), bool)
        for _ in range(draw(st.integers(0, 5))):
            cy, cx = rng.uniform(-0.2, 1.2, 2) * (h, w)
            ry, rx = rng.uniform(0.5, 0.7 * max(h, w), 2)
            m ^= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    elif kind == "rects":
        m = np.zeros((h, w), bool)
        for _ in range(draw(st.integers(0, 6))):
            y0, y1 = sorted(rng.integers(0, h + 1, 2))
            x0, x1 = sorted(rng.integers(0, w + 1, 2))
            m[y0:y1, x0:x1] = ~m[y0:y1, x0:x1]
    else:
        period = draw(st.integers(1, 40))
        m = (np.arange(h * w).reshape(h, w) // period) % 2 == 1
    if draw(st.booleans()):
        return m
    # uint8 masks, including values other than 0/255
    palette = draw(
        st.lists(st.integers(0, 255), min_size=2, max_size=2).filter(lambda p: p[0] != p[1])
        | st.just([0, 255])
    )
    out = np.where(m, palette[1], palette[0]).astype(np.uint8)
    if draw(st.booleans()):  # sprinkle arbitrary byte values
        k = draw(st.integers(1, 8))
        out[rng.integers(0, h, k), rng.integers(0, w, k)] = rng.integers(0, 256, k)
    return out


# ---------------------------------------------------------- property tests


@SETTINGS
@given(masks())
def test_encode_matches_sdk_and_round_trips(mask: np.ndarray) -> None:
    check_mask(mask)


@SETTINGS
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(st.integers(0, 255), min_size=1, max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_uint8_multi_valued_masks(h: int, w: int, palette: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    # runs of random lengths over a small palette
    flat = np.repeat(rng.choice(palette, h * w), rng.integers(1, 30, h * w))[: h * w]
    check_mask(flat.astype(np.uint8).reshape(h, w))


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, 255),
            st.sampled_from([1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 255, 256, 257, 258, 300]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_encode_values_matches_encode_rle(runs: list[tuple[int, int]]) -> None:
    """Raw value arrays (no 4x repeat) reach every token class, incl. runs of 1."""
    values = np.concatenate([np.full(n, v, np.uint8) for v, n in runs])
    ours = rle.encode_values(values)
    assert ours == encode_rle(values)
    np.testing.assert_array_equal(rle.decode_values(ours), values)


# ------------------------------------------------------------ adversarial


def checkerboard(h: int, w: int) -> np.ndarray:
    return np.indices((h, w)).sum(0) % 2 == 1


ADVERSARIAL = {
    "zeros": np.zeros((37, 53), bool),
    "ones": np.ones((37, 53), bool),
    "ones_uint8_1": np.ones((5, 7), np.uint8),
    "single_px": np.zeros((1, 1), bool),
    "single_px_on": np.ones((1, 1), bool),
    "one_pixel_set": np.pad(np.ones((1, 1), bool), ((20, 11), (3, 40))),
    "corner_pixels": np.pad(np.zeros((8, 8), bool), 1, constant_values=True),
    "checkerboard": checkerboard(64, 64),
    "checkerboard_odd": checkerboard(63, 65),
    "alternating_rows": (np.arange(64)[:, None] % 2 == 0) & np.ones((64, 64), bool),
    "alternating_cols": (np.arange(64)[None, :] % 2 == 0) & np.ones((64, 64), bool),
    "column": np.ones((64, 1), bool),
    "row": np.ones((1, 64), bool),
    "all_values": np.arange(256, dtype=np.uint8).reshape(16, 16),
    "uint8_gradient": (np.arange(40 * 40) // 7 % 256).astype(np.uint8).reshape(40, 40),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial(name: str) -> None:
    check_mask(ADVERSARIAL[name])


# pixel runs p give value runs 4p: 4/8 (<= 8), 12/16 (9..16), 20/256 (17..256),
# 260 (> 256), 65536/65540 (one full chunk, one chunk + 4), 131072/131076
BOUNDARY_PIXEL_RUNS = [1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32767, 32768, 32769]


@pytest.mark.parametrize("p", BOUNDARY_PIXEL_RUNS)
def test_run_length_boundaries_in_masks(p: int) -> None:
    check_mask(np.zeros((1, p), bool))  # one run of 4p
    check_mask(np.full((1, p), 200, np.uint8))
    m = np.zeros((1, p + 3), bool)  # 1 px, p px, 2 px
    m[0, 1 : p + 1] = True
    check_mask(m)


@pytest.mark.parametrize(
    "shape", [(2, 8192), (4, 8192), (2, 8193), (3, 21846), (16, 1024), (32, 1024), (33, 1024)]
)
def test_long_runs_spanning_rows(shape: tuple[int, int]) -> None:
    check_mask(np.zeros(shape, bool))
    m = np.ones(shape, bool)
    m[-1, -1] = False
    check_mask(m)


@pytest.mark.parametrize(
    "n", [1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 131073, 196609]
)
def test_exact_value_run_boundaries(n: int) -> None:
    """Run lengths the 4x repeat cannot produce, straight through encode_rle."""
    for values in (
        np.full(n, 9, np.uint8),
        np.concatenate([[1], np.full(n, 0, np.uint8), [2, 3]]).astype(np.uint8),
    ):
        ours = rle.encode_values(values)
        assert ours == encode_rle(values)
        np.testing.assert_array_equal(rle.decode_values(ours), values)


def test_bit_length_multiple_of_8_gets_a_full_zero_byte() -> None:
    """The SDK pads 8 - bits % 8 zero bits: a whole byte when already aligned."""
    hits = 0
    for w in range(1, 40):
        for k in range(0, w + 1):
            m = np.zeros((1, w), bool)
            m[0, :k] = True
            bits = sdk_bit_length(np.repeat(as_uint8(m).ravel(), 4))
            if bits % 8:
                continue
            hits += 1
            ours = check_mask(m)
            assert len(ours) * 8 == bits + 8 and ours[-1] == 0
    assert hits >= 5


def test_encode_accepts_int_masks_and_rejects_bad_ones() -> None:
    m = np.array([[0, 3], [255, 255]], np.int64)
    assert rle.encode(m) == mask2rle(m.astype(np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros(5, bool))
    with pytest.raises(ValueError, match="0..255"):
        rle.encode(np.array([[256]]))
    with pytest.raises(ValueError, match="dtype"):
        rle.encode(np.zeros((2, 2), np.float32))


def test_empty_mask_is_header_only() -> None:
    out = rle.encode(np.zeros((0, 5), bool))
    assert len(out) == 7  # 53 header bits + 3 padding bits
    assert rle.decode(out, 0, 5).shape == (0, 5)


# --------------------------------------------------------------- decoding


def bit_stream(num: int, word_size: int, sizes: list[int], tokens: list[str]) -> list[int]:
    bits = f"{num:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes)
    bits += "".join(tokens)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


@SETTINGS
@given(st.data())
def test_decode_matches_sdk_on_general_streams(data: st.DataObject) -> None:
    """Any header parameters and multi-word literal groups (as the browser's
    rle-pack encoder writes), compared with the SDK's decode_rle."""
    word_size = data.draw(st.integers(1, 8))
    sizes = data.draw(st.lists(st.integers(1, 10), min_size=4, max_size=4))
    tokens, values = [], []
    for _ in range(data.draw(st.integers(1, 25))):
        idx = data.draw(st.integers(0, 3))
        n = data.draw(st.integers(1, min(2 ** sizes[idx], 40)))
        head = f"{idx:02b}{n - 1:0{sizes[idx]}b}"
        words = data.draw(st.lists(st.integers(0, 2**word_size - 1), min_size=n, max_size=n))
        if data.draw(st.booleans()):
            tokens.append("1" + head + f"{words[0]:0{word_size}b}")
            values += [words[0]] * n
        else:
            tokens.append("0" + head + "".join(f"{x:0{word_size}b}" for x in words))
            values += words
    for _ in range(-len(values) % 4):  # fill up to whole RGBA pixels
        tokens.append("0" + "00" + "0" * sizes[0] + "0" * word_size)
        values.append(0)
    stream = bit_stream(len(values), word_size, sizes, tokens)
    expected = np.array(values, np.uint8)
    np.testing.assert_array_equal(decode_rle(stream), expected)
    np.testing.assert_array_equal(rle.decode_values(stream), expected)
    np.testing.assert_array_equal(rle.decode(stream, 1, len(values) // 4), expected[3::4][None])


def test_decode_clips_a_run_that_overshoots_num() -> None:
    # 6 values declared, one repeat token of 8 (rle-pack and the SDK clip too)
    stream = bit_stream(6, 8, [3, 4, 8, 16], ["1" + "00" + "111" + f"{77:08b}"])
    np.testing.assert_array_equal(rle.decode_values(stream), decode_rle(stream))


def test_decode_validates_header_count() -> None:
    out = rle.encode(np.ones((3, 4), bool))
    np.testing.assert_array_equal(rle.decode(out, 3, 4), np.full((3, 4), 255))
    with pytest.raises(ValueError, match=r"header holds 48 values .* 4x4 .* needs 64"):
        rle.decode(out, 4, 4)
    with pytest.raises(ValueError, match="height \\* width \\* 4"):
        rle.decode(out, 3, 5)


def test_decode_rejects_malformed_streams() -> None:
    out = rle.encode(np.eye(8, dtype=bool))
    with pytest.raises(ValueError, match="truncated"):
        rle.decode(out[:-3], 8, 8)
    with pytest.raises(ValueError, match="header"):
        rle.decode(out[:5], 8, 8)
    with pytest.raises(ValueError, match="0..255"):
        rle.decode([*out[:-1], 256], 8, 8)
    with pytest.raises(ValueError, match="word size"):
        rle.decode(bit_stream(4, 16, [3, 4, 8, 16], ["1" + "00" + "011" + "0" * 16]), 1, 1)


def test_decode_accepts_bytes_and_arrays() -> None:
    m = checkerboard(5, 6)
    out = rle.encode(m)
    for form in (bytes(out), np.array(out, np.uint8), np.array(out)):
        np.testing.assert_array_equal(rle.decode(form, 5, 6), as_uint8(m))


def test_runs_across_comparison_chunks_match_the_sdk(monkeypatch) -> None:
    """Runs are found in chunks of _COMPARE_CHUNK values (bounded memory on large masks): a change exactly at a
    chunk's edge, runs spanning several chunks and a last short chunk give the SDK's bytes."""
    monkeypatch.setattr(rle, "_COMPARE_CHUNK", 64)
    rng = np.random.default_rng(3)
    mask = np.zeros((37, 29), bool)  # 1073 values: 16 whole chunks and a part
    mask.flat[64:128] = True  # one run exactly one chunk long, from a chunk edge to the next
    mask.flat[200:600] = True  # a run over six chunks
    mask.flat[1000:] = rng.random(73) > 0.5
    assert rle.encode(mask) == list(mask2rle(mask.astype(np.uint8) * 255))
    assert np.array_equal(rle.decode(rle.encode(mask), 37, 29) > 0, mask)
