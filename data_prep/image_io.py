"""Robust image decoding, resizing and PNG encoding shared by the audit, the builders and
the input pipeline.

Everything decodes to ``uint8`` arrays: ``(H, W)`` for greyscale, ``(H, W, 3)`` for colour.
Valid but unusual images are converted, never rejected: 16-bit and float greyscale are
min-max scaled to 8 bits, RGBA/LA are composited over black, palette/CMYK/YCbCr/LAB go to
RGB, 1-bit goes to L. An RGB image whose three channels are equal is returned as greyscale.
DICOM files (by extension or the ``DICM`` magic) are read with pydicom.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image

# Medical images can be big; we never decode untrusted giant images in a hot loop, but do
# not refuse large valid scans either.
PIL.Image.MAX_IMAGE_PIXELS = 30000 * 30000

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".webp",
    ".dcm",
    ".dicom",
)
DICOM_EXTENSIONS = (".dcm", ".dicom")


class DecodeError(ValueError):
    """Raised when a file cannot be decoded as an image.

    ``kind`` is the audit problem kind: 'empty_file', 'not_an_image' or 'undecodable'.
    """

    def __init__(self, message: str, kind: str = "undecodable"):
        super().__init__(message)
        self.kind = kind


@dataclass
class DecodedImage:
    """A decoded image plus what we learned about the file."""

    pixels: np.ndarray  # uint8 (H, W) or (H, W, 3)
    mode: str  # the source mode, e.g. 'L', 'RGB', 'I;16', 'CMYK', 'DICOM:MONOCHROME2'
    file_format: str  # 'JPEG', 'PNG', 'DICOM', ...
    width: int
    height: int

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else 3


def is_image_name(path: str) -> bool:
    """True when the file name has an image (or DICOM) extension."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _is_dicom(data: bytes, path: str | None) -> bool:
    if path is not None and os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS:
        return True
    return len(data) > 132 and data[128:132] == b"DICM"


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Min-max scales any numeric array to uint8 (a constant image maps to 0)."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.round((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def collapse_grey(pixels: np.ndarray) -> np.ndarray:
    """Returns (H, W) when an (H, W, 3) image has three equal channels, else the input."""
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(
            pixels[..., 0], pixels[..., 2]
        ):
            return np.ascontiguousarray(pixels[..., 0])
    return pixels


def pil_to_array(img: PIL.Image.Image) -> np.ndarray:
    """Converts any PIL image to uint8 (H, W) or (H, W, 3), see the module docstring."""
    mode = img.mode
    if mode == "L":
        out = np.asarray(img, dtype=np.uint8)
    elif mode == "1":
        out = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        out = _scale_to_uint8(np.asarray(img))
    elif mode == "LA" or mode == "La":
        a = np.asarray(img.convert("LA"), dtype=np.float32)
        out = np.round(a[..., 0] * a[..., 1] / 255.0).astype(np.uint8)
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        a = np.asarray(img.convert("RGBA"), dtype=np.float32)
        out = np.round(a[..., :3] * a[..., 3:4] / 255.0).astype(np.uint8)
    elif mode == "RGB":
        out = np.asarray(img, dtype=np.uint8)
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if out.ndim == 3 and out.shape[2] == 3:
        out = collapse_grey(out)
    return np.ascontiguousarray(out)


def decode_dicom(data: bytes) -> tuple[np.ndarray, str]:
    """Decodes DICOM bytes: rescale slope/intercept, VOI window, MONOCHROME1 inversion.

    A multi-frame image (NumberOfFrames > 1: a cine loop, a volume) gives its middle frame,
    frame NumberOfFrames // 2, the only one decoded. Colour comes out RGB: pydicom converts
    YBR photometric interpretations while decoding (the mode keeps the file's own name).
    """
    import pydicom  # local import: only DICOM users pay for it
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=frames // 2 if frames > 1 else None)
    except Exception as e:  # pydicom raises many kinds
        raise DecodeError(f"not a readable DICOM image ({type(e).__name__}: {e})") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) == 3 and arr.ndim == 3:
        return collapse_grey(_scale_to_uint8(arr) if arr.dtype != np.uint8 else arr), (
            f"DICOM:{photometric}"
        )
    a = arr.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    a = a * slope + intercept
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        w = max(w, 1.0)
        # DICOM PS3.3 C.11.2.1.2 linear VOI function.
        a = np.clip(((a - (c - 0.5)) / (w - 1.0) + 0.5), 0.0, 1.0) * 255.0
        out = np.round(a).astype(np.uint8)
    else:
        out = _scale_to_uint8(a)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out, f"DICOM:{photometric}"


def decode_bytes(data: bytes, path: str | None = None) -> DecodedImage:
    """Decodes encoded image bytes (any PIL format or DICOM). Raises DecodeError."""
    if not data:
        raise DecodeError("empty file (0 bytes)", "empty_file")
    if _is_dicom(data, path):
        pixels, mode = decode_dicom(data)
        return DecodedImage(pixels, mode, "DICOM", pixels.shape[1], pixels.shape[0])
    try:
        img = PIL.Image.open(io.BytesIO(data))
        fmt = img.format or "?"
        mode = img.mode
        img.load()  # forces full decode: catches truncated files
        pixels = pil_to_array(img)
    except PIL.UnidentifiedImageError as e:
        raise DecodeError("not an image (unrecognised format)", "not_an_image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"undecodable image ({e})") from e
    return DecodedImage(pixels, mode, fmt, pixels.shape[1], pixels.shape[0])


def decode_file(path: str) -> DecodedImage:
    """Reads and decodes one file; errors name the file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_bytes(data, path)
    except DecodeError as e:
        raise DecodeError(f"{path}: {e}", e.kind) from e


def resize_longer_side(pixels: np.ndarray, max_size: int) -> np.ndarray:
    """Shrinks (never enlarges) so the longer side is at most max_size (Lanczos)."""
    h, w = pixels.shape[:2]
    if max(h, w) <= max_size:
        return pixels
    scale = max_size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = PIL.Image.fromarray(pixels)
    return np.asarray(img.resize((nw, nh), PIL.Image.Resampling.LANCZOS))


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Returns (H, W) for channels=1 (RGB averaged) or (H, W, 3) for channels=3."""
    if channels == 1:
        if pixels.ndim == 3:
            return np.round(pixels.astype(np.float32).mean(axis=-1)).astype(pixels.dtype)
        return pixels
    if channels == 3:
        if pixels.ndim == 2:
            return np.repeat(pixels[..., None], 3, axis=-1)
        return pixels
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def encode_png(pixels: np.ndarray) -> bytes:
    """Encodes uint8 (H, W), (H, W, 1) or (H, W, 3) as PNG."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """Encodes uint8 (H, W), (H, W, 1) or (H, W, 3) as JPEG (4:4:4, no chroma subsampling)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(pixels)).save(
        buf, format="JPEG", quality=quality, subsampling=0
    )
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decodes PNG (or any PIL) bytes we wrote ourselves to a uint8 array."""
    img = PIL.Image.open(io.BytesIO(data))
    return np.asarray(img)
