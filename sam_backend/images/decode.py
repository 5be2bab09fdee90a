"""Image bytes to the array SAM takes.

In: the bytes of an image (as fetched or read) and the pixel limit (MAX_IMAGE_PIXELS).
Out: a C-contiguous (H, W, 3) uint8 RGB array, H x W as displayed (see `decode_image`).
Raises ImageError: 415 empty, not an image, or a format outside FORMATS; 422 truncated or corrupt; 413 more
pixels than the limit (refused from the header, before the pixels are decoded) or too large for memory.
"""
from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_backend.errors import ImageError

log = logging.getLogger("sam_backend.images")  # the package's one logger, as before the split

#: formats decode_image() accepts; Pillow's other plugins (many rarely used, some fragile) are not exposed
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "AVIF")  # JPEG includes MPO (multi-picture JPEG)
#: leading bytes of those formats: data starting so that Pillow cannot read is corrupt (422), not foreign (415)
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes into a C-contiguous (H, W, 3) uint8 RGB array, H x W as displayed.

    EXIF orientation is applied (so H and W are those the Label Studio editor shows); animated images and
    multi-page TIFFs give their first frame; grayscale, palette, CMYK, YCbCr and bilevel images are converted
    to RGB; 16-bit samples are scaled to 8 bits (v * 255 / 65535, rounded); an alpha channel is dropped (the
    stored colours are kept, as cv2.imread does for SAM), not composited. Images with more than `max_pixels`
    pixels are refused from their header, before their pixels are decoded.
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
                                  f"MAX_IMAGE_PIXELS={max_pixels}")
        try:
            image.seek(0)
            image.load()
            rgb = _to_rgb(_oriented(image))
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
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise ImageError(422, f"the image decoded to an unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb, dtype=np.uint8)



def _oriented(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says; as is when the EXIF data cannot be read."""
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block: keep the pixels, lose the orientation
        log.debug("ignoring unreadable EXIF data: %s: %s", type(exc).__name__, exc)
        return image
    return oriented if oriented is not None else image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded image in any mode Pillow gives for the accepted formats."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
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
