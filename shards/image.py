"""Image encoding for shards and decoding for readers (PIL, and pydicom for DICOM).

Two kinds of image (see ``shards/intensity.py``):

* **8-bit** (grey ``L``, RGB, and everything PIL converts to RGB): stored as PNG/JPEG bytes kept as
  they were (other formats re-encoded as PNG), decoded to uint8 H x W x C (C = 1 or 3).
* **windowed**: 16-bit grey (``I;16``), 32-bit int (``I``) and float (``F``) PNG/TIFF, and grey
  DICOM. Stored LOSSLESSLY: 16-bit values as a 16-bit grey PNG (a 16-bit PNG input is kept as it
  was), other int and float values as a float32 TIFF, DICOM as its stored values plus the row's
  ``pixel_map`` (``shards/dicom.py``). Decoded to float32 values, then windowed to [0, 1] by the
  dataset's window (``--window``, recorded in the manifest): the training pipeline keeps 16 bits of
  that (``ray_jobs.classifier.pipeline``), the uint8 readers 8.

Why lossless 16-bit rather than windowing to 8 bits at ingest: the window is a modelling choice
(and a dataset window is only known once every train image has been read); the stored pixels stay
the source's, the window is applied where the model reads them, and the model gets 16 bits of the
windowed range instead of 8 (a CT lung window of 1400 HU keeps every HU).

Multi-page TIFF (and multi-frame DICOM) is refused unless ``--frames`` names the page to take.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from medbalance.errors import DataError
from shards.dicom import DICOM_EXTENSIONS, is_dicom, pick_frame, read_dicom
from shards.intensity import Window, apply_window, rank_samples, to_grey, unit_sums

KEPT_FORMATS = {"PNG", "JPEG"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm"} | DICOM_EXTENSIONS
WINDOWED_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


# What PIL raises for bytes that are not a (complete, sane) image. A decompression bomb (an image
# whose pixel count exceeds PIL's limit) is refused like any other undecodable file.
_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


@dataclasses.dataclass
class Pixels:
    """An image as read.

    Attributes:
        array: H x W x C. 8-bit images: uint8, C in {1, 3}. Windowed images: float64 values in the
            file's units (after the pixel map), C = 1.
        windowed: whether ``array`` holds values that a window maps to [0, 1].
        own_window: the file's own window (DICOM), for ``--window auto``.
        invert: DICOM MONOCHROME1 (inverted after windowing).
    """

    array: np.ndarray
    windowed: bool = False
    own_window: tuple[float, float] | None = None
    invert: bool = False

    def unit(self, window: Window | str | None = None) -> np.ndarray:
        """H x W x C float32 in [0, 1]: ``/ 255`` for 8-bit images, the window for windowed ones."""
        if not self.windowed:
            return self.array.astype(np.float32) / 255.0
        window = window if isinstance(window, Window) else Window.parse(window)
        lo, hi = window.bounds(self.array, self.own_window)
        return apply_window(self.array, lo, hi, self.invert)

    def uint8(self, window: Window | str | None = None) -> np.ndarray:
        """H x W x C uint8: as stored for 8-bit images, windowed and rounded for windowed ones."""
        if not self.windowed:
            return self.array
        return np.rint(self.unit(window) * 255.0).astype(np.uint8)


def _pil_array(img: Image.Image) -> tuple[np.ndarray, bool]:
    """PIL image -> (H x W x C array, windowed): uint8 L / RGB, or float64 values for 16/32-bit modes."""
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)[:, :, None], False
    if img.mode in WINDOWED_MODES:
        return np.asarray(img).astype(np.float64)[:, :, None], True
    return np.asarray(img.convert("RGB"), dtype=np.uint8), False


def _decode_failure(where: str, exc: Exception) -> DataError:
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"{where}: refused as a possible decompression bomb ({exc}); if it is a real "
                         "image, downscale it before ingest")
    # PIL names the in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x...>"),
    # which says nothing to a user: the file or row is named by ``where``.
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
    return DataError(f"{where}: cannot decode image ({reason})")


def _open(data: bytes, where: str, frames: str | None) -> tuple[np.ndarray, bool, str, int, int]:
    """PIL decode: ``(array, windowed, format, page, pages)``; multi-page TIFF needs ``frames``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            pages = getattr(img, "n_frames", 1) if fmt == "TIFF" else 1
            page = pick_frame(frames, pages, where, what="pages (a multi-page TIFF)")
            if page:
                img.seek(page)
            img.load()
            array, windowed = _pil_array(img)
    except _DECODE_ERRORS as exc:
        raise _decode_failure(where, exc) from exc
    if windowed and not np.isfinite(array).all():
        raise DataError(f"{where}: has NaN or infinite pixel values; fix the file")
    return array, windowed, fmt, page, pages


def read_pixels(data: bytes, where: str = "image", *, pixel_map: dict | None = None,
                frames: str | None = None, window: Window | str | None = None) -> Pixels:
    """Decode stored or original image bytes.

    Args:
        data: PNG/JPEG/TIFF/... or DICOM bytes.
        where: file or shard row, for messages.
        pixel_map: the row's ``pixel_map`` (stored DICOM rows): values = stored * scale + offset.
        frames: ``--frames`` for multi-page TIFF / multi-frame DICOM originals (predict on files).
        window: the window that will be applied (DICOM originals keep their own VOI only for auto).

    Raises:
        DataError: undecodable bytes, naming ``where``.
    """
    if is_dicom(data):
        kind = window.kind if isinstance(window, Window) else Window.parse(window).kind
        dicom = read_dicom(data, where, frames, use_own_window=kind == "auto")
        if dicom.pixel_map is None:
            return Pixels(dicom.stored)
        return _mapped(dicom.stored[:, :, None], dicom.pixel_map)
    array, windowed, _, _, _ = _open(data, where, frames)
    if pixel_map is not None:
        return _mapped(array, pixel_map)
    return Pixels(array, windowed)


def _mapped(stored: np.ndarray, pixel_map: dict) -> Pixels:
    values = stored.astype(np.float64) * pixel_map["scale"] + pixel_map["offset"]
    own = None
    if pixel_map.get("window_low") is not None:
        own = (pixel_map["window_low"], pixel_map["window_high"])
    return Pixels(values, True, own, bool(pixel_map.get("invert")))


@dataclasses.dataclass
class Encoded:
    """One image ready for a shard row (``image``, ``height``, ``width``, ``channels``,
    ``pixel_map``, ``dicom``) plus its ``summary`` for the dataset statistics (``TrainStats``)."""

    image: bytes
    height: int
    width: int
    channels: int
    pixel_map: dict | None = None
    dicom: dict | None = None
    summary: dict | None = None

    def row(self) -> dict:
        return {"image": self.image, "height": self.height, "width": self.width, "channels": self.channels,
                "pixel_map": self.pixel_map, "dicom": self.dicom}


def image_summary(pixels: Pixels, window: Window, seed: bytes) -> dict:
    """What TrainStats needs of one image (exact sums, or rank samples for a dataset window)."""
    summary = {"windowed": pixels.windowed, "pixels": int(pixels.array.shape[0] * pixels.array.shape[1]),
               "invert": pixels.invert, "sums": None, "samples": None}
    if pixels.windowed and window.scope == "dataset":
        summary.update(samples=rank_samples(pixels.array, seed), min=float(pixels.array.min()),
                       max=float(pixels.array.max()))
    else:
        summary["sums"] = unit_sums(pixels.unit(window))
    return summary


def encode_file_bytes(data: bytes, where: str, window: Window | str | None = None,
                      frames: str | None = None) -> Encoded:
    """Check and (if needed) re-encode one image file (see the module docstring for what is stored).

    Args:
        data: the file's bytes.
        where: file name or row, for the error message.
        window: the dataset's ``--window`` (DICOM keeps its own VOI only for ``auto``).
        frames: ``--frames``: which page/frame of a multi-page TIFF or multi-frame DICOM to take.

    Raises:
        DataError: if the bytes do not decode to an image (or need ``--frames``).
    """
    window = window if isinstance(window, Window) else Window.parse(window)
    seed = data[:4096]
    if is_dicom(data):
        dicom = read_dicom(data, where, frames, use_own_window=window.kind == "auto")
        stored = dicom.stored if dicom.stored.ndim == 3 else dicom.stored[:, :, None]
        pixels = Pixels(stored) if dicom.pixel_map is None else _mapped(stored, dicom.pixel_map)
        encoded = encode_array_png(dicom.stored)
        return Encoded(encoded, stored.shape[0], stored.shape[1], stored.shape[2], dicom.pixel_map, dicom.meta,
                       image_summary(pixels, window, seed))
    try:
        array, windowed, fmt, page, pages = _open(data, where, frames)
    except DataError as exc:
        if "--frames" in str(exc):
            raise
        raise DataError(f"{exc}; remove or replace the file and run again") from exc
    if windowed:
        values = array[:, :, 0]
        if fmt == "PNG" and pages == 1 and values.min() >= 0 and values.max() <= 65535:
            encoded = data  # a 16-bit PNG: kept as it is
        elif values.min() >= 0 and values.max() <= 65535 and np.all(values == np.rint(values)):
            encoded = encode_array_png(values.astype(np.uint16))
        else:
            encoded = encode_array_tiff(values.astype(np.float32))
    elif fmt in KEPT_FORMATS and pages == 1:
        encoded = data
    else:
        encoded = encode_array_png(array)
    height, width, channels = array.shape
    return Encoded(encoded, height, width, channels, summary=image_summary(Pixels(array, windowed), window, seed))


def encode_array_png(array: np.ndarray) -> bytes:
    """H x W (x C) uint8, or H x W uint16, array -> PNG bytes (lossless)."""
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"image arrays must be uint8 (or uint16 grey), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.uint16 and array.ndim != 2:
        raise DataError(f"16-bit images must be grey (H x W), got shape {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_array_tiff(array: np.ndarray) -> bytes:
    """H x W float32 -> single-page TIFF bytes (lossless; values outside 16 bits or fractional)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.float32)).save(buf, format="TIFF", compression="tiff_deflate")
    return buf.getvalue()


def decode_image(data: bytes, where: str = "image", window: Window | str | None = None,
                 pixel_map: dict | None = None) -> np.ndarray:
    """Encoded bytes -> H x W x C uint8 array (C = 1 or 3); windowed images windowed (default auto)."""
    return read_pixels(data, where, pixel_map=pixel_map, window=window).uint8(window)


def to_chw(pixels: Pixels, window: Window | str | None = None, channels: int = 3,
           as_float: bool = False) -> np.ndarray:
    """Pixels -> C x H x W (C = ``channels``: grey repeated to 3, or RGB to luma for 1).

    Returns uint8, or float32 in [0, 1] when ``as_float``.
    """
    hwc = pixels.unit(window) if as_float else pixels.uint8(window)
    if channels == 1:
        hwc = to_grey(hwc)
    elif hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
