"""Image encoding for shards and decoding for readers (PIL; uint8 everywhere)."""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from medbalance.errors import DataError

KEPT_FORMATS = {"PNG", "JPEG"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm"}


# What PIL raises for bytes that are not a (complete, sane) image. A decompression bomb (an image
# whose pixel count exceeds PIL's limit) is refused like any other undecodable file.
_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def _to_array(img: Image.Image, where: str) -> np.ndarray:
    """PIL image -> H x W x C uint8 with C in {1, 3} (grey stays grey; anything else -> RGB)."""
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)[:, :, None]
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise DataError(f"{where}: {img.mode} images (16/32-bit) are not supported; convert to 8-bit first")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _decode_failure(where: str, exc: Exception) -> DataError:
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"{where}: refused as a possible decompression bomb ({exc}); if it is a real "
                         "image, downscale it before ingest")
    return DataError(f"{where}: cannot decode image ({exc})")


def encode_file_bytes(data: bytes, where: str) -> tuple[bytes, int, int, int]:
    """Check and (if needed) re-encode one image file.

    Args:
        data: the file's bytes.
        where: file name or row, for the error message.

    Returns:
        ``(encoded, height, width, channels)``: PNG and JPEG bytes are kept as they are;
        other formats (BMP, TIFF, ...) are re-encoded as PNG.

    Raises:
        DataError: if the bytes do not decode to an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
            array = _to_array(img, where)
    except _DECODE_ERRORS as exc:
        raise DataError(f"{_decode_failure(where, exc)}; remove or replace the file and run again") from exc
    if fmt not in KEPT_FORMATS:
        data = encode_array_png(array)
    height, width, channels = array.shape
    return data, height, width, channels


def encode_array_png(array: np.ndarray) -> bytes:
    """H x W (x C) uint8 array -> PNG bytes (lossless)."""
    if array.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Encoded bytes -> H x W x C uint8 array (C = 1 or 3)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(img, where)
    except _DECODE_ERRORS as exc:
        raise _decode_failure(where, exc) from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
