"""Decode image and mask files into the arrays tumorseg trains on.

Images (PNG, JPEG, TIFF, BMP) become uint8, one array per file:

- 8-bit images are used as they are. A colour image whose bands are all equal (a grey scan saved
  as RGB, as in the Kaggle data) counts as one channel; otherwise each band is a channel (e.g. the
  three MR sequences of the LGG "kaggle_3m" TIFFs).
- Images that are **not 8-bit** (16-bit PNG/TIFF, 32-bit integer or float) are normalised per
  image and per channel: clipped to that channel's 0.5th..99.5th percentile and scaled to 0..255
  (``NORMALISATION``, part of the cache key). MR intensities have no fixed scale, so a global
  mapping would let one bright scan darken all the others.
- Resizing to the training size is bilinear, per channel, after normalisation.

Masks are read as integer label images (0/255, 0/1 or label ids; a palette PNG gives its indices).
A JPEG mask is thresholded at 128 first: lossy compression smears its edges into stray values.
Masks are resized with nearest neighbour (pixel-centre rule, like the polygon rasteriser).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tumorseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CLIP_PERCENTILES = (0.5, 99.5)
NORMALISATION = f"8-bit as is; otherwise per-image per-channel percentile clip {CLIP_PERCENTILES[0]:g}-{CLIP_PERCENTILES[1]:g} to 0-255"
_READ_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)
_BANDS = {"1": 1, "L": 1, "P": 3, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1, "F": 1, "LA": 1, "PA": 3}
_BITS = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, without decoding its pixels."""

    hw: tuple[int, int]
    bands: int  # channels before the grey check
    bit_depth: int
    mode: str


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _pil_can_decode(image: Image.Image) -> bool:
    """PIL opens a multi-band TIFF of more than 8 bits as 8-bit (silently wrong): not those."""
    if image.format != "TIFF" or image.mode in _BITS:
        return True
    bits = image.tag_v2.get(258, 8)  # BitsPerSample
    return max(bits if isinstance(bits, tuple) else (bits,)) <= 8


def read_header(path: Path) -> ImageHeader:
    """Size, bands and bit depth of an image file (reads the header only)."""
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            if not _pil_can_decode(image):
                raise OSError("more than 8 bits per band")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except _READ_ERRORS as err:
        header = _cv2_header(path)
        if header is None:
            raise DataError(f"{path}: unreadable or truncated image ({err})") from None
        return header
    bands = 4 if mode in ("RGBA", "RGBa") else _BANDS.get(mode, 3)  # a constant alpha is dropped on reading
    return ImageHeader((size[1], size[0]), bands, _BITS.get(mode, 8), mode)


def _cv2_header(path: Path) -> ImageHeader | None:
    """Multi-band 16-bit TIFFs that PIL cannot open: read them with OpenCV."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    array = _cv2_read(path)
    if array is None:
        return None
    bands = 1 if array.ndim == 2 else array.shape[2]
    return ImageHeader(array.shape[:2], bands, array.dtype.itemsize * 8, f"cv2-{array.dtype}x{bands}")


def _tiff_fallback(path: Path, err: Exception, what: str) -> np.ndarray:
    """A TIFF that PIL cannot read (e.g. float or 16-bit multi-band) through OpenCV; else the error, one line."""
    array = _cv2_read(path) if path.suffix.lower() in (".tif", ".tiff") else None
    if array is None:
        raise DataError(f"{path}: unreadable or truncated {what} ({err})") from None
    return array


def _cv2_read(path: Path) -> np.ndarray | None:
    import cv2

    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is not None and array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., [2, 1, 0, 3][: array.shape[2]]]  # BGR(A) -> RGB(A)
    return _drop_constant_alpha(array)


def _drop_constant_alpha(array: np.ndarray | None) -> np.ndarray | None:
    """A 4th band that is constant is an alpha channel, not an MR sequence: drop it."""
    if array is not None and array.ndim == 3 and array.shape[2] == 4 and array[..., 3].min() == array[..., 3].max():
        return np.ascontiguousarray(array[..., :3])
    return array


def read_pixels(path: Path) -> np.ndarray:
    """All pixels of an image file, ``(H, W)`` or ``(H, W, C)`` in the file's own dtype."""
    try:
        with Image.open(path) as image:
            if not _pil_can_decode(image):
                raise OSError("more than 8 bits per band")
            image.load()
            if image.mode in ("P", "PA", "RGBa", "CMYK", "YCbCr", "LA"):
                image = image.convert("L" if image.mode == "LA" else "RGB")
            return _drop_constant_alpha(np.asarray(image))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except _READ_ERRORS as err:
        return _tiff_fallback(path, err, "image")


def bands_equal(array: np.ndarray, tolerance: int = 2) -> bool:
    """Whether every band of an ``(H, W, C)`` image equals the first (a grey image stored as colour)."""
    if array.ndim == 2:
        return True
    if array.dtype.kind in "ib":  # signed (a difference could overflow) or bool (no subtraction)
        array = array.astype(np.int64)
    first = array[..., 0]
    for c in range(1, array.shape[2]):  # |band - first| as max - min: no wrap-around, no wide copy
        band = array[..., c]
        if (np.maximum(band, first) - np.minimum(band, first)).max() > tolerance:
            return False
    return True


def to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is; any other dtype clipped per channel to its percentiles and scaled to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    low, high = np.percentile(flat, CLIP_PERCENTILES, axis=(0, 1))  # (C,) each
    high = np.where(high > low, high, low + 1)
    scaled = (flat - low) / (high - low)
    out = np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return out.reshape(array.shape)


def _resize_band(band: np.ndarray, size_px: int | None) -> np.ndarray:
    if size_px is None or band.shape == (size_px, size_px):
        return band
    return np.asarray(Image.fromarray(band).resize((size_px, size_px), Image.Resampling.BILINEAR))


def decode_gray(path: Path, size_px: int | None, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """One file as 1-channel uint8 ``(S, S)`` (``size_px`` None: native). Colour is converted to
    luma; non-8-bit intensities are normalised (see the module doc)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if expected_hw is not None and (image.height, image.width) != tuple(expected_hw):
                raise DataError(
                    f"{path}: image is {image.width}x{image.height} but the annotations say "
                    f"{expected_hw[1]}x{expected_hw[0]}"
                )
            if (image.mode not in _BITS or image.mode == "1") and _pil_can_decode(image):  # 8-bit: the fast path
                if size_px is not None and image.format == "JPEG":
                    image.draft("L", (size_px, size_px))  # DCT-domain downscale: decodes 2-8x faster
                gray = image.convert("L")
                if size_px is not None and gray.size != (size_px, size_px):
                    gray = gray.resize((size_px, size_px), Image.Resampling.BILINEAR)
                return np.asarray(gray, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except _READ_ERRORS as err:
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise DataError(f"{path}: unreadable or truncated image ({err})") from None
    array = read_pixels(path)
    if array.ndim == 3:
        array = array.mean(-1) if array.dtype != np.uint8 else np.asarray(Image.fromarray(array[..., :3]).convert("L"))
    return _resize_band(to_uint8(array), size_px)


def decode_channels(path: Path, size_px: int | None) -> np.ndarray:
    """One multi-band file as uint8 ``(C, S, S)``, each band normalised and resized on its own."""
    array = to_uint8(read_pixels(Path(path)))
    if array.ndim == 2:
        array = array[..., None]
    return np.stack([_resize_band(np.ascontiguousarray(array[..., c]), size_px) for c in range(array.shape[2])])


def check_gray(path: Path, expected: str) -> None:
    """A DataError (one line) when ``path`` is a colour image (bands that differ) where one channel
    is ``expected``: converting it to luma would silently drop what its bands hold."""
    header = read_header(path)
    if header.bands > 1 and not bands_equal(read_pixels(path)):
        raise DataError(f"{path}: the image has {header.bands} channels but {expected}")


def decode_for_model(path: Path, size_px: int | None, channels: int) -> np.ndarray:
    """One image file for a model taking ``channels`` channels, decoded as in training: uint8
    ``(S, S)`` or ``(C, S, S)``; a DataError (one line) when the file has another channel count."""
    path = Path(path)
    if channels == 1:
        check_gray(path, "the model takes 1")
        return decode_gray(path, size_px)
    image = decode_channels(path, size_px)
    if image.shape[0] != channels:
        raise DataError(f"{path}: the image has {image.shape[0]} channel(s) but the model takes {channels}")
    return image


def read_mask(path: Path) -> np.ndarray:
    """A mask file as an integer label image ``(H, W)``."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode, fmt = image.mode, image.format
            array = np.asarray(image)
    except FileNotFoundError:
        raise DataError(f"mask not found: {path}") from None
    except _READ_ERRORS as err:
        array, mode, fmt = _tiff_fallback(path, err, "mask"), "cv2", "TIFF"
    if array.ndim == 3:
        if not bands_equal(array, tolerance=0 if fmt != "JPEG" else 2):
            raise DataError(f"{path}: colour mask (its bands differ); expected a one-band label image")
        array = array[..., 0]
    if mode == "1":
        array = array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise DataError(f"{path}: mask holds non-integer values; expected label ids")
        array = array.astype(np.int64)
    if fmt == "JPEG":
        array = (array >= 128).astype(np.uint8)
    return array


def resize_mask(mask01: np.ndarray, size_px: int) -> np.ndarray:
    """A {0,1} uint8 mask resized to ``size_px`` square by nearest neighbour (pixel centres)."""
    if mask01.shape == (size_px, size_px):
        return mask01
    return np.asarray(Image.fromarray(mask01).resize((size_px, size_px), Image.Resampling.NEAREST))
