"""DICOM images with pydicom (the optional extra ``medbalance[dicom]``): pixels, units, window.

What a DICOM file becomes (PS3.3 C.7.6.3, C.11.1, C.11.2):

* **Stored pixels**, kept losslessly: grey images as a 16-bit PNG of the stored values (signed
  values shifted by +32768), 8-bit RGB (or YBR, converted by pydicom) as an RGB PNG.
* **Pixel map** (the shard's ``pixel_map`` column): ``value = png * scale + offset`` gives the
  Modality values: Rescale Slope/Intercept (e.g. Hounsfield units for CT). A Modality LUT
  Sequence is applied here instead (its output stored, scale 1).
* **Own window** (for ``--window auto``): the first Window Center/Width with the LINEAR or
  LINEAR_EXACT VOI function. A VOI LUT Sequence, or the SIGMOID function, is not a linear window:
  it is applied here with ``pydicom.pixels.apply_voi_lut`` and its output stored (own window = the
  output range), so the model sees what a viewer shows. With any other ``--window`` the file's VOI
  is ignored and the Modality values are stored.
* **MONOCHROME1** (high values dark) is inverted after windowing (``invert`` in the pixel map).
* **Multi-frame** files are refused unless ``--frames`` picks one frame (``first``, ``middle``,
  ``last`` or a 0-based index); the choice is recorded in the manifest and the row.
* **Metadata**: only a whitelist of non-identifying tags goes into the row's ``dicom`` column
  (Modality, Rows, Columns, PixelSpacing or ImagerPixelSpacing, PhotometricInterpretation,
  BitsStored, NumberOfFrames, the frame taken). Nothing else (no patient, study, date, institution
  or device tag) is read into shards, the manifest or any message.

Compressed transfer syntaxes need pydicom's decoding plugins: RLE Lossless works as is; JPEG and
JPEG 2000 need ``pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`` (or Pillow with the
matching codecs). A file that cannot be decoded is refused with that advice.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np

from medbalance.errors import DataError

DICOM_EXTENSIONS = {".dcm", ".dicom"}
_SIGNED_SHIFT = 32768
_INSTALL = "install the DICOM extra: pip install 'medbalance[dicom]' (pydicom)"
_PLUGINS = ("install pydicom's decoding plugins for compressed DICOM: pip install pylibjpeg "
            "pylibjpeg-libjpeg pylibjpeg-openjpeg")


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


@dataclasses.dataclass
class DicomImage:
    """One DICOM frame as it is stored in a shard.

    Attributes:
        stored: H x W uint16 (grey), or H x W x 3 uint8 (colour).
        pixel_map: ``{"scale", "offset", "window_low", "window_high", "invert"}`` for grey, None for colour.
        meta: the whitelisted tags (see the module docstring).
    """

    stored: np.ndarray
    pixel_map: dict | None
    meta: dict


def pick_frame(spec: str | None, count: int, where: str, what: str = "frames") -> int:
    """The 0-based frame that ``--frames`` selects out of ``count``.

    Raises:
        DataError: several frames and no ``--frames``, or an index out of range.
    """
    if count <= 1:
        return 0
    if spec is None:
        raise DataError(f"{where}: has {count} {what}; pass --frames first|middle|last|N to take one "
                        f"(0-based), or split the file into single-frame images")
    index = {"first": 0, "middle": count // 2, "last": count - 1}.get(str(spec))
    if index is None:
        try:
            index = int(spec)
        except ValueError:
            raise DataError(f"--frames {spec!r}: use first, middle, last or a 0-based index") from None
    if not 0 <= index < count:
        raise DataError(f"{where}: --frames {spec} is out of range: the file has {count} {what} (0-{count - 1})")
    return index


def _first(value) -> float:
    """A DS/IS value or the first of a multi-valued one."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _meta(ds, frame: int, frames: int) -> dict:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return {"modality": str(ds.get("Modality", "")) or None, "rows": int(ds.Rows), "columns": int(ds.Columns),
            "pixel_spacing": [float(v) for v in spacing] if spacing else None,
            "photometric": str(ds.PhotometricInterpretation), "bits_stored": int(ds.get("BitsStored", 0)),
            "frames": frames, "frame": frame}


def _own_window(ds, stored, scale: float, offset: float, apply_voi_lut):
    """The file's own VOI: a linear window (DICOM PS3.3 C.11.2.1.2: LINEAR or LINEAR_EXACT) as
    ``(low, high)`` in modality units, or a VOI LUT / sigmoid applied to the values here.

    Returns:
        ``(stored, scale, offset, window_low, window_high)``: unchanged with no window in the file.
    """
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if "WindowCenter" in ds and "WindowWidth" in ds and function in ("LINEAR", "LINEAR_EXACT"):
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if function == "LINEAR":
            return stored, scale, offset, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        return stored, scale, offset, center - width / 2, center + width / 2
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and function == "SIGMOID"):
        values = stored.astype(np.float64) * scale + offset
        stored = np.rint(apply_voi_lut(values, ds, index=0, prefer_lut=True))
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) if "VOILUTSequence" in ds else int(ds.get("BitsStored", 16))
        return stored, 1.0, 0.0, 0.0, float(2 ** bits - 1)
    return stored, scale, offset, None, None


def read_dicom(data: bytes, where: str, frames: str | None = None, use_own_window: bool = True) -> DicomImage:
    """Decode one DICOM file (see the module docstring).

    Args:
        data: the file's bytes.
        where: the file, for messages.
        frames: the ``--frames`` choice for multi-frame files.
        use_own_window: ``--window auto``: keep the file's VOI (window or LUT).

    Raises:
        DataError: not decodable, multi-frame without ``--frames``, an unsupported photometric
            interpretation, or pydicom missing; naming the file and what to do.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise DataError(f"{where} is a DICOM file: {_INSTALL}") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        count = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DataError(f"{where}: not a readable DICOM file ({type(exc).__name__}: {exc}); "
                        "remove or replace it") from None
    if "PixelData" not in ds:
        raise DataError(f"{where}: DICOM file without pixel data (a report or structured document?); remove it")
    frame = pick_frame(frames, count, where)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 (missing plugin, damaged pixel data)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        advice = _PLUGINS if syntax is not None and getattr(syntax, "is_compressed", False) else "remove or replace it"
        raise DataError(f"{where}: cannot decode its pixel data (transfer syntax {name}: {exc}); {advice}") from None
    if count > 1:
        pixels = pixels[frame]
    meta = _meta(ds, frame, count)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise DataError(f"{where}: {photometric} DICOM with {pixels.dtype} samples is not supported "
                            "(colour must be 8-bit); convert it to 8-bit RGB first")
        return DicomImage(np.ascontiguousarray(pixels), None, meta)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{where}: photometric interpretation {photometric} is not supported (MONOCHROME1, "
                        "MONOCHROME2, RGB and YBR are); convert the image first")
    if pixels.dtype.kind == "f":
        raise DataError(f"{where}: float pixel data is not supported; store it as integers with a "
                        "Rescale Slope/Intercept")
    scale, offset = 1.0, 0.0
    if "ModalityLUTSequence" in ds:
        stored = np.asarray(apply_modality_lut(pixels, ds))
    else:
        stored = pixels
        scale, offset = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    window_low = window_high = None
    if use_own_window:
        stored, scale, offset, window_low, window_high = _own_window(ds, stored, scale, offset, apply_voi_lut)
    stored = np.asarray(stored)
    if stored.min(initial=0) < 0:
        if stored.min() < -_SIGNED_SHIFT or stored.max() >= _SIGNED_SHIFT:
            raise DataError(f"{where}: pixel values {stored.min()}..{stored.max()} do not fit 16 bits")
        stored = stored.astype(np.int32) + _SIGNED_SHIFT
        offset -= _SIGNED_SHIFT * scale
    if stored.max(initial=0) > 65535:
        raise DataError(f"{where}: pixel values up to {stored.max()} do not fit 16 bits")
    pixel_map = {"scale": scale, "offset": offset, "window_low": window_low, "window_high": window_high,
                 "invert": photometric == "MONOCHROME1"}
    return DicomImage(np.ascontiguousarray(stored.astype(np.uint16)), pixel_map, meta)
