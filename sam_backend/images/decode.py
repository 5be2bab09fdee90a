"""Image bytes to the array SAM takes.

In: the bytes of an image (as fetched or read) and the pixel limit (MAX_IMAGE_PIXELS).
Out: `decode` gives a `DecodedImage`: its size (H, W) as displayed and a C-contiguous (h, w, 3) uint8 RGB array of
its pixels, reduced for images of more than REDUCE_ABOVE_PIXELS (what the SAM encoders see is at most 1024 pixels
a side, so a 100 Mpx image is never held as 300 MB of RGB); `decode_image` gives the whole (H, W, 3) array.
Raises ImageError: 415 empty, not an image, or a format outside FORMATS; 422 truncated or corrupt; 413 more
pixels than the limit (refused from the header, before the pixels are decoded) or too large for memory.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sam_backend.errors import ImageError

log = logging.getLogger("sam_backend.images")  # the package's one logger, as before the split

#: formats decode_image() accepts; Pillow's other plugins (many rarely used, some fragile) are not exposed
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "AVIF")  # JPEG includes MPO (multi-picture JPEG)
#: leading bytes of those formats: data starting so that Pillow cannot read is corrupt (422), not foreign (415)
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

#: images of more pixels than this are reduced while they are decoded (JPEG: by its DCT scaling, before the pixels
#: exist; others: right after), to REDUCED_SIDE pixels on their longest side. Below it the pixels are given whole,
#: so masks on photos up to 16 Mpx are exactly those of SAM's reference predictor on the same image.
REDUCE_ABOVE_PIXELS = 16_000_000
#: longest side of a reduced image: twice what the SAM encoders take (1024), so that each encoder's own resize still
#: only shrinks it (SAM 2 stretches the short side to 1024 too)
REDUCED_SIDE = 2048
#: EXIF orientations (tag 0x0112) that swap width and height, and the turn that shows each as meant
_TRANSPOSING = (5, 6, 7, 8)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class DecodedImage:
    """An image as the encoder takes it.

    pixels: (h, w, 3) uint8 RGB, C-contiguous: the whole image, or for an image of more than REDUCE_ABOVE_PIXELS
        pixels a copy reduced to REDUCED_SIDE pixels on its longest side (the same aspect ratio, to the pixel).
    size: (H, W) of the image as displayed, in pixels (EXIF orientation applied): the frame of prompts and masks.
    """

    pixels: np.ndarray
    size: tuple[int, int]

    @property
    def reduced(self) -> bool:
        return tuple(self.pixels.shape[:2]) != self.size


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes into a C-contiguous (H, W, 3) uint8 RGB array, H x W as displayed: `decode`, never reduced."""
    return decode(data, max_pixels, reduce=False).pixels


def decode(data: bytes, max_pixels: int, reduce: bool = True) -> DecodedImage:
    """Decode image bytes into the RGB pixels the encoder takes and the size the user sees.

    EXIF orientation is applied (so H and W are those the Label Studio editor shows); animated images and
    multi-page TIFFs give their first frame; grayscale, palette, CMYK, YCbCr and bilevel images are converted
    to RGB; 16-bit samples are scaled to 8 bits (v * 255 / 65535, rounded); an alpha channel is dropped (the
    stored colours are kept, as cv2.imread does for SAM), not composited. Images with more than `max_pixels`
    pixels are refused from their header, before their pixels are decoded. With `reduce`, images of more than
    REDUCE_ABOVE_PIXELS pixels come reduced (see DecodedImage), in memory of about 4 bytes per pixel at most
    (JPEG: 4 bytes per pixel of the reduced size).
    Raises ImageError: 415 not an image (or a format outside JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF),
    422 truncated or corrupt, 413 too many pixels.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ImageError(415, "the image is empty (0 bytes)")
    data = bytes(data)
    try:
        Image.init()  # registers every plugin once; after that a no-op
        image = Image.open(io.BytesIO(data), formats=[name for name in FORMATS if name in Image.OPEN])
    except Image.DecompressionBombError as exc:
        raise ImageError(413, f"the image has too many pixels ({exc}); MAX_IMAGE_PIXELS={max_pixels}") \
            from None
    except UnidentifiedImageError:
        if data.startswith(MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageError(422, "the image is corrupt (its header cannot be read)") from None
        raise ImageError(415, f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # Pillow plugins raise many kinds on malformed headers
        raise ImageError(422, f"the image is corrupt: {type(exc).__name__}: {exc}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(422, f"the image has zero size ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(413, f"the image has {width}x{height} = {width * height} pixels, more than "
                                  f"MAX_IMAGE_PIXELS={max_pixels}; raise that setting to serve it (about 5 bytes "
                                  f"of memory per pixel and click)")
        try:
            image.seek(0)
            target = _reduced_size(width, height) if reduce and width * height > REDUCE_ABOVE_PIXELS else None
            if target is not None and image.format == "JPEG":
                image.draft("RGB", target)  # DCT scaling by 1/2, 1/4 or 1/8, to no less than `target`
            image.load()
            orientation = _orientation(image)  # after load(): a PNG's eXIf chunk may follow its pixels
            size = (width, height) if orientation in _TRANSPOSING else (height, width)
            if target is not None:
                image = _resized(image, target)
            rgb = _to_rgb(_oriented(image, orientation))
        except Image.DecompressionBombError as exc:
            raise ImageError(413, f"the image has too many pixels ({exc}); MAX_IMAGE_PIXELS={max_pixels}") \
                from None
        except MemoryError:
            raise ImageError(413, f"the image ({width}x{height}) does not fit in memory") from None
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(422, f"the {image.format or ''} image is truncated or corrupt: "
                                  f"{type(exc).__name__}: {exc}".replace("  ", " ")) from None
    expected = size if target is None else ((target[0], target[1]) if orientation in _TRANSPOSING
                                            else (target[1], target[0]))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or tuple(rgb.shape[:2]) != expected:
        raise ImageError(422, f"the image decoded to an unexpected shape {rgb.shape}")
    return DecodedImage(pixels=np.ascontiguousarray(rgb, dtype=np.uint8), size=size)


def _reduced_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) of an image of `width` x `height` with its longest side scaled to REDUCED_SIDE."""
    scale = REDUCED_SIDE / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def _resized(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """`image` resized to `target` (w, h): a box-filter reduction, then PIL's bilinear filter (antialiased).

    Palette and bilevel images are converted first (PIL resizes those by their nearest pixel only).
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    # reducing_gap: first shrink by a whole factor with a box filter (Image.reduce), leaving at least 3x for the
    # bilinear pass: the bilinear pass alone keeps a (target width x full height) intermediate, 82 MB at 100 Mpx
    return image.resize(target, Image.BILINEAR, reducing_gap=3.0)


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1..8 (1 when absent or unreadable)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception as exc:  # a malformed EXIF block: keep the pixels, lose the orientation
        log.debug("ignoring unreadable EXIF data: %s: %s", type(exc).__name__, exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned as its EXIF `orientation` (1..8) says, as `ImageOps.exif_transpose` does; as is for 1."""
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded image in any mode Pillow gives for the accepted formats."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
            gray = values.astype(np.uint8)
        else:
            # (v * 255 + 32767) // 65535 in uint32 (at most 2**24): 4 bytes a pixel, not int64's 8 three times over
            scaled = (values if values.dtype.kind == "u" else np.clip(values, 0, 65535)).astype(np.uint32)
            scaled *= 255
            scaled += 32767
            scaled //= 65535
            gray = scaled.astype(np.uint8)
            del scaled
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as exc:
            raise ImageError(415, f"unsupported pixel format {mode}: {exc}") from None
    return np.array(image, dtype=np.uint8)
