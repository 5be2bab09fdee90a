"""Label Studio brush RLE: a fast, vectorised encoder and a checked decoder.

Label Studio stores brush masks as the ``rle`` list of a ``brushlabels``
result: the bytes of a bit stream in the format of thi.ng's ``rle-pack``,
describing the *RGBA* image of the mask (every mask pixel repeated 4 times,
row-major, the mask value in all four channels).

Bit stream (most significant bit first):

* header, 53 bits:
    - 32 bits: number of values ``num`` (``H * W * 4`` for a brush mask),
    - 5 bits:  word size - 1 (``8`` -> ``00111``),
    - 4 x 4 bits: the four run-length field sizes - 1 (``[3, 4, 8, 16]``);
* then tokens until ``num`` values have been produced.  Each token is
  ``flag (1 bit) | size index i (2 bits) | n - 1 (rle_sizes[i] bits)`` followed by
    - flag 1 ("repeat"):  one word, repeated ``n`` times,
    - flag 0 ("literal"): ``n`` words, each used once;
* zero padding to a whole number of bytes.

The Python encoder of ``label_studio_sdk.converter.brush`` (``mask2rle`` ->
``encode_rle``), which this module reproduces byte for byte, has quirks:

* a run of length 1 is written as a literal of one word ``0 00 000 vvvvvvvv``;
  longer runs use repeat tokens: 2..8 ``1 00 nnn``, 9..16 ``1 01 nnnn``,
  17..256 ``1 10`` + 8 bits, and *every* run longer than 256 uses ``1 11`` +
  16 bits: while the rest exceeds 65536 a chunk of 65536 (field 65535) is
  written, then the remainder (1..65536) is written with ``1 11`` + 16 bits
  too, however short it is (e.g. a run of 65537 ends in a 1-value 27-bit
  token);
* it never emits literal groups of more than one word (the browser's encoder
  does, so :func:`decode` handles them);
* the padding is ``8 - bits % 8`` zero bits, so a stream whose length is
  already a multiple of 8 gets a whole extra zero byte;
* since ``mask2rle`` repeats each pixel 4 times, run lengths in a mask stream
  are always multiples of 4, so the 1-value literal form never appears there.

:func:`encode` finds the runs on the (H, W) mask itself (lengths x 4), builds
all tokens and their bit widths as arrays and packs them without a Python
loop over runs.  :func:`decode` walks the tokens in Python (token boundaries
are inherently sequential) and expands runs with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["encode", "encode_values", "decode", "decode_values"]

WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
HEADER_BITS = 32 + 5 + 4 * 4  # 53
CHANNELS = 4
_MAX_VALUES = 2**32 - 1  # the header's count field is 32 bits wide
_CHUNK = 2**16  # longest run one "1 11" token can describe
_MASK64 = (1 << 64) - 1
_COMPARE_CHUNK = 1 << 22  # values compared at once when finding runs (4 MB of temporaries)


def _flat_uint8_runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a 1-D array: (lengths int64 (R,), values uint8 (R,)); R >= 1 for n >= 1."""
    n = flat.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    cmp = flat.view(np.uint8) if flat.dtype == np.bool_ else flat
    # where a value differs from the one before it, in chunks: one comparison of the whole array would be a second
    # array of the mask's size (100 MB for a 100 Mpx mask) on top of it
    change = np.concatenate([np.flatnonzero(cmp[start + 1: stop + 1] != cmp[start: stop]) + (start + 1)
                             for start in range(0, max(n - 1, 1), _COMPARE_CHUNK)
                             for stop in (min(start + _COMPARE_CHUNK, n - 1),)])
    starts = np.empty(change.size + 1, np.int64)
    starts[0] = 0
    starts[1:] = change
    lengths = np.empty_like(starts)
    lengths[:-1] = np.diff(starts)
    lengths[-1] = n - starts[-1]
    values = flat[starts]
    if values.dtype == np.bool_:
        values = values.astype(np.uint8) * np.uint8(255)
    return lengths, values.astype(np.uint8, copy=False)


# Token classes of the SDK encoder, indexed by
#   0: run 2..8, 1: run 9..16, 2: run 17..256, 3: run > 256 (16-bit field,
#   also for the remainder), 4: run of 1 (a one-word literal).
# width = flag(1) + size index(2) + count field + word(8);
# _CLASS_PREFIX is flag|index already shifted above the count field and word.
_CLASS_WIDTH = np.array([14, 15, 19, 27, 14], np.int64)
_CLASS_PREFIX = np.array(
    [0b100 << 11, 0b101 << 12, 0b110 << 16, 0b111 << 24, 0b000 << 11], np.uint64
)


def _run_tokens(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the SDK encoder for runs (lengths (R,) >= 1, values (R,) uint8).

    Returns (codes uint64 (T,), widths int64 (T,)), each code right-aligned in
    its width (14, 15, 19 or 27 bits); T = R + number of extra 65536-chunks.
    """
    L = lengths.astype(np.int64, copy=False)
    cls = (L > 8).astype(np.int8)
    cls += L > 16
    cls += L > 256
    cls[L == 1] = 4
    # full 65536-value chunks written before the final token of a long run
    extra = np.where(L > _CHUNK, (L - 1) // _CHUNK, 0)
    if extra.any():
        reps = extra + 1
        run_of_tok = np.repeat(np.arange(L.size), reps)
        first_tok = np.cumsum(reps) - reps
        k = np.arange(run_of_tok.size) - first_tok[run_of_tok]
        e = extra[run_of_tok]
        # chunk tokens hold 65536 values; the last one the remainder (1..65536)
        L = np.where(k == e, L[run_of_tok] - e * _CHUNK, _CHUNK)
        cls = cls[run_of_tok]
        values = values[run_of_tok]
    codes = _CLASS_PREFIX[cls]
    codes |= (L - 1).astype(np.uint64) << np.uint64(8)
    codes |= values.astype(np.uint64)
    return codes, _CLASS_WIDTH[cls]


def _pack(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate right-aligned codes (uint64 (T,)) of the given widths
    (int64 (T,), each 1..64) MSB first, pad with ``8 - bits % 8`` zero bits
    (the SDK quirk: a whole zero byte when already aligned) and return the
    bytes, uint8 (nbytes,).

    Works on big-endian 64-bit output words: a code lands in the word holding
    its first bit and may spill into the next one.  Codes are sorted by
    offset, so each word's contributions are OR-reduced with ``reduceat``;
    only the last code of a word can spill, so spills never collide.
    """
    ends = np.cumsum(widths)
    total = int(ends[-1])
    nbytes = total // 8 + 1  # == (total + 8 - total % 8) // 8
    offsets = ends - widths
    word = offsets >> 6
    free = 64 - (offsets & 63) - widths  # bits left after the code in its word
    spill = np.flatnonzero(free < 0)
    s_codes = codes[spill]
    s_free = free[spill]
    np.maximum(free, 0, out=free)
    head = codes << free.astype(np.uint64)
    head[spill] = s_codes >> (-s_free).astype(np.uint64)
    out = np.zeros((nbytes + 7) // 8 + 1, np.uint64)
    first = np.flatnonzero(word[1:] != word[:-1]) + 1
    first = np.concatenate([[0], first])
    out[word[first]] = np.bitwise_or.reduceat(head, first)
    # the spilled low bits start the next word; high bits fall off the shift
    out[word[spill] + 1] |= s_codes << (64 + s_free).astype(np.uint64)
    return out.astype(">u8").view(np.uint8)[:nbytes]


def _encode_runs(lengths: np.ndarray, values: np.ndarray, num: int) -> list[int]:
    if num > _MAX_VALUES:
        raise ValueError(f"{num} values do not fit the 32-bit RLE header")
    header_codes = np.array(
        [num, ((WORD_SIZE - 1) << 16) | int("".join(f"{s - 1:04b}" for s in RLE_SIZES), 2)],
        np.uint64,
    )
    header_widths = np.array([32, 21], np.int64)
    codes, widths = _run_tokens(lengths, values)
    return _pack(
        np.concatenate([header_codes, codes]), np.concatenate([header_widths, widths])
    ).tolist()


def _as_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_ or a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"mask must be bool or uint8, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError("mask values must be within 0..255")
    return a.astype(np.uint8)


def encode(mask: np.ndarray) -> list[int]:
    """Encode a (H, W) mask as Label Studio brush RLE.

    ``mask``: shape (H, W), dtype bool (False/True -> 0/255) or uint8 (0..255;
    other integer dtypes with values in 0..255 are accepted).  Returns the RLE
    as a list of ints in 0..255, byte-identical to
    ``label_studio_sdk.converter.brush.mask2rle(mask_as_uint8)``.  An empty
    mask gives a header-only stream (the SDK raises on it).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    flat = _as_uint8(mask).ravel()
    lengths, values = _flat_uint8_runs(flat)
    return _encode_runs(lengths * CHANNELS, values, flat.size * CHANNELS)


def encode_values(values: np.ndarray) -> list[int]:
    """Encode a 1-D array of values (shape (N,), uint8 or bool -> 0/255) exactly
    like ``label_studio_sdk.converter.brush.encode_rle(values)`` (no 4x repeat).
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    flat = _as_uint8(values)
    lengths, vals = _flat_uint8_runs(flat)
    return _encode_runs(lengths, vals, flat.size)


def _rle_bytes(rle: Sequence[int] | bytes | np.ndarray) -> bytes:
    if isinstance(rle, (bytes, bytearray)):
        return bytes(rle)
    arr = np.asarray(rle)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError("rle must be a flat list of ints in 0..255")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("rle values must be bytes (0..255)")
    return arr.astype(np.uint8).tobytes()


def _header(data: bytes) -> tuple[int, int, list[int]]:
    if len(data) * 8 < HEADER_BITS:
        raise ValueError(f"RLE too short for its {HEADER_BITS}-bit header: {len(data)} bytes")
    h = int.from_bytes(data[:7], "big") >> (56 - HEADER_BITS)
    num = h >> 21
    word_size = ((h >> 16) & 0x1F) + 1
    rle_sizes = [((h >> (12 - 4 * i)) & 0xF) + 1 for i in range(4)]
    return num, word_size, rle_sizes


def decode_values(rle: Sequence[int] | bytes | np.ndarray) -> np.ndarray:
    """Decode an RLE stream to its flat values, shape (num,), uint8.

    Accepts any header parameters (word size <= 8 so values fit uint8; rle
    sizes 1..16) and both repeat and multi-word literal tokens.  Raises
    ValueError on a malformed or truncated stream.
    """
    data = _rle_bytes(rle)
    num, word_size, rle_sizes = _header(data)
    if word_size > 8:
        raise ValueError(f"word size {word_size} > 8 does not fit a uint8 alpha channel")
    nbits = len(data) * 8
    buf = data + bytes(8)  # so every 8-byte window read below is full
    from_bytes = int.from_bytes
    wmask = (1 << word_size) - 1
    # per size index: (bits before the word, mask of the count field)
    fields = [(3 + s, (1 << s) - 1) for s in rle_sizes]

    run_len: list[int] = []  # values per token (clipped at num)
    run_val: list[int] = []  # repeated value, or -1 for a literal group
    literal_pos: list[tuple[int, int, int]] = []  # (token index, first word bit, count)
    i = 0
    p = HEADER_BITS
    while i < num:
        # a 64-bit window holds flag + index + 16-bit count + word at any bit offset
        win = (from_bytes(buf[p >> 3 : (p >> 3) + 8], "big") << (p & 7)) & _MASK64
        flag = (win >> 63) & 1
        idx = (win >> 61) & 3
        head, fmask = fields[idx]
        n = ((win >> (61 - head + 3)) & fmask) + 1
        if flag:
            width = head + word_size
            run_val.append((win >> (64 - width)) & wmask)
        else:
            width = head + n * word_size
            literal_pos.append((len(run_len), p + head, n))
            run_val.append(-1)
        if p + width > nbits:
            raise ValueError(f"RLE stream truncated: needs {p + width} bits, has {nbits}")
        run_len.append(min(n, num - i))
        i += n
        p += width

    lengths = np.array(run_len, np.int64)
    vals = np.array(run_val, np.int64)
    out = np.repeat(np.where(vals < 0, 0, vals).astype(np.uint8), lengths)
    if literal_pos:
        bits = np.unpackbits(np.frombuffer(data, np.uint8))
        starts = np.cumsum(lengths) - lengths
        weights = 1 << np.arange(word_size - 1, -1, -1)
        for tok, q, n in literal_pos:
            take = int(lengths[tok])
            words = bits[q : q + n * word_size].reshape(n, word_size)[:take] @ weights
            out[starts[tok] : starts[tok] + take] = words
    return out


def decode(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to the mask: the alpha channel, shape
    (height, width), uint8.

    Raises ValueError if the header's value count is not ``height * width * 4``
    or the stream is malformed.
    """
    data = _rle_bytes(rle)
    num, _, _ = _header(data)
    expected = int(height) * int(width) * CHANNELS
    if height < 0 or width < 0 or num != expected:
        raise ValueError(
            f"RLE header holds {num} values but a {height}x{width} RGBA image "
            f"needs {expected} (= height * width * 4)"
        )
    return decode_values(data).reshape(height, width, CHANNELS)[:, :, 3].copy()
