"""Reading SEM images and masks as users hand them over.

PNG, TIFF and JPEG; 8- and 16-bit; grey, RGB (grey copied into 3 channels), RGBA and
palette images. Failures raise :class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from srpu_pipelines.errors import UserError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe
Image.MAX_IMAGE_PIXELS = 40_000 * 40_000
# tifffile logs a warning for every ImageJ-style TIFF whose metadata shape disagrees with
# its first page; the page is what we read, so the warning is only noise.
logging.getLogger("tifffile").setLevel(logging.ERROR)
log = logging.getLogger(__name__)


class ImageReadError(UserError, ValueError):
    """A file that cannot be used as an image; the message names it and says why."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_tifffile(path: Path) -> np.ndarray | None:
    """Pixels of a TIFF as stored (PIL reads 16-bit RGB TIFFs as 8-bit); None for palette
    TIFFs, which PIL decodes with their colour map. Only the first page is read."""
    import tifffile

    compression = None
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            compression = _compression_name(page.compression)
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
                return None
            if len(tf.pages) > 1:
                log.warning("%s: TIFF has %d pages; reading the first", path, len(tf.pages))
            arr = page.asarray()
            if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
                # 0 means white here: invert so that bright stays bright (as PIL does)
                arr = ~arr if arr.dtype == np.bool_ else np.iinfo(arr.dtype).max - arr
    except Exception as e:  # tifffile raises many types; re-raised with the file name
        raise ImageReadError(_tiff_error(path, compression, e)) from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) storage
    return arr


def _compression_name(code: object) -> str:
    """TIFF compression by name (tifffile keeps an unknown code as a plain int)."""
    import tifffile

    try:
        return tifffile.COMPRESSION(int(code)).name  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return f"code {code}"


def _tiff_error(path: Path, compression: str | None, e: Exception) -> str:
    """What went wrong with a TIFF, by its real cause: a codec this environment lacks is
    not a damaged file."""
    msg = f"{type(e).__name__}: {e}"
    if "requires the 'imagecodecs' package" in str(e):
        return (
            f"{path}: TIFF compressed with {compression or 'a codec'}, which needs the "
            f"'imagecodecs' package (pip install imagecodecs; it is a dependency of srpu, "
            f"so this environment is incomplete); the file itself may be fine ({msg})"
        )
    if compression is None:
        return f"{path}: not a readable TIFF (damaged or truncated header: {msg})"
    if compression != "NONE":
        return f"{path}: TIFF pixel data ({compression}-compressed) damaged or truncated ({msg})"
    return f"{path}: TIFF pixel data damaged or truncated ({msg})"


def _from_bilevel(arr: np.ndarray, palette: str) -> np.ndarray:
    """1-bit pixels: 0/1 when raw values are asked for ("index"), else 0/255 grey."""
    return arr.astype(np.uint8) * (1 if palette == "index" else 255)


def read_raw(path: str | Path, palette: str = "rgb") -> np.ndarray:
    """Pixel array of an image file, dtype as stored: (H, W) or (H, W, C).

    ``palette``: for palette ('P') images, "rgb" expands the palette to colours and
    "index" returns the palette indices (how some painters store class-index masks);
    1-bit images give 0/1 with "index" and 0/255 with "rgb".
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if not is_image_file(path):
        raise ImageReadError(
            f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})"
        )
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = _read_tifffile(path)
        if arr is not None:
            if arr.dtype == np.bool_:
                arr = _from_bilevel(arr, palette)
            return _check_shape(path, arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 2 else arr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if mode == "P":
                    # palette indices as stored, or the colours they stand for
                    arr = np.array(im.convert("RGBA") if palette == "rgb" else im)
                elif mode in ("I;16", "I;16B", "I;16L"):
                    arr = np.array(im).astype(np.uint16)
                elif mode == "I":
                    arr = np.array(im)
                    if arr.min() >= 0 and arr.max() <= 65535:
                        arr = arr.astype(np.uint16)
                elif mode in ("1", "L", "LA", "RGB", "RGBA", "F"):
                    arr = np.array(im)
                    if mode == "LA":
                        arr = arr[..., 0]
                    if mode == "1":
                        arr = _from_bilevel(arr, palette)
                else:
                    arr = np.array(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        raise ImageReadError(f"{path}: unreadable or truncated image ({e})") from None
    except (ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: corrupt image ({e})") from None
    return _check_shape(path, arr)


def _check_shape(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[-1] > 4):
        raise ImageReadError(
            f"{path}: unsupported image shape {arr.shape} (multi-page or volume TIFF?)"
        )
    return arr


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Any integer or float pixel array as float32 in [0, 1]; 16-bit is scaled, not clipped."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if info.min < 0:
            arr = arr.astype(np.float64) - info.min
            return (arr / (info.max - info.min)).astype(np.float32)
        return (arr.astype(np.float64) / info.max).astype(np.float32)
    arr = arr.astype(np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if lo >= 0.0 and hi <= 1.0:
        return np.nan_to_num(arr)
    return np.nan_to_num((arr - lo) / max(hi - lo, 1e-12)).astype(np.float32)


def read_grey(path: str | Path) -> np.ndarray:
    """An SEM micrograph as float32 (H, W) in [0, 1].

    Colour images become grey: when R, G and B are equal (grey copied into 3 channels),
    one channel is taken exactly; otherwise the luminance. Alpha is dropped.
    """
    return to_grey(read_raw(path, palette="rgb"))


def to_grey(arr: np.ndarray) -> np.ndarray:
    """A raw image array (as :func:`read_raw` returns it) as float32 (H, W) in [0, 1]."""
    if arr.ndim == 3:
        rgb = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if rgb.shape[-1] == 1 or (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            arr = rgb[..., 0]
        else:
            f = to_unit_float(rgb)
            return (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]).astype(np.float32)
    return to_unit_float(arr)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels where possible."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w
    except (UnidentifiedImageError, OSError):
        arr = read_raw(path)
        return int(arr.shape[0]), int(arr.shape[1])
