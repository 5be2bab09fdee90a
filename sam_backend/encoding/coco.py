"""COCO compressed RLE (https://cocodataset.org/#format-data), without pycocotools.

A mask's runs in column-major order, alternating background / object and starting with background, stored
as pycocotools writes them: `{"size": [H, W], "counts": str}` (`rle_encode`), the string packing each count
as 5-bit groups (`compress_counts`). `rle_decode` also takes the uncompressed form (`counts` a list of ints).
tests/unit/test_coco.py checks the strings against pycocotools when that is installed.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of the mask in column-major order, alternating background / object, background first
    (so the first count is 0 when the top-left pixel is set)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


def compress_counts(counts: Iterable[int]) -> str:
    """pycocotools' string form of RLE counts: each count from the fourth on is stored as its difference to
    the count two before; each number as little-endian 5-bit groups with a sign bit (0x10) in the last group,
    0x20 marking "more groups follow", each group + 48 as one ASCII character."""
    counts = list(counts)
    chars = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative values end at -1
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr(group + 48 + (0x20 if more else 0)))
    return "".join(chars)


def decompress_counts(text: str) -> list[int]:
    """Inverse of `compress_counts`."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("COCO RLE string ends inside a number")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"character {text[position]!r} is not COCO RLE")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) mask -> {"size": [H, W], "counts": str}, as pycocotools.mask.encode (decoded to str) gives."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": compress_counts(rle_counts(mask))}


def rle_decode(segmentation: Mapping[str, Any]) -> np.ndarray:
    """{"size": [H, W], "counts": str or list of ints} -> (H, W) bool."""
    height, width = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    counts = decompress_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels, a {height}x{width} mask has {height * width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")
