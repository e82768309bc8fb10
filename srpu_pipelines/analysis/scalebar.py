"""Scale bars for the pictures people look at (overlays, prediction previews).

A bar is drawn only where the pixel size is known: a picture without one says nothing
about size rather than something wrong. Its length is the 1-2-5 step nearest to a fifth of
the picture's width, in the unit that keeps the number between 1 and 999.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from srpu_pipelines.errors import InputError

_UNITS = [(1e6, "mm"), (1e3, "µm"), (1.0, "nm")]


def nice_length_nm(pixel_size_nm: float, width_px: int, share: float = 0.2) -> float:
    """The 1-2-5 length in nm nearest below ``share`` of the picture's width."""
    if pixel_size_nm <= 0 or width_px <= 0:
        raise InputError(f"scale bar: pixel size {pixel_size_nm} nm and width {width_px} px")
    want = pixel_size_nm * width_px * share
    exp = math.floor(math.log10(want))
    for step in (5, 2, 1):
        if step * 10**exp <= want:
            return float(step * 10**exp)
    return float(10**exp)


def length_label(nm: float) -> str:
    """'500 nm', '2 µm', '1.5 mm': the unit that keeps the number readable."""
    for scale, unit in _UNITS:
        if nm >= scale:
            v = nm / scale
            return f"{v:g} {unit}"
    return f"{nm:g} nm"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_scale_bar(
    rgb: np.ndarray, pixel_size_nm: float | None, bottom: int | None = None
) -> tuple[np.ndarray, dict | None]:
    """``rgb`` (H, W, 3) uint8 with a scale bar at its lower right, above row ``bottom``
    (the start of the data bar, so the bar never covers it; default: the last row); and
    what was drawn ({'length_nm', 'pixels', 'label'}), or (rgb, None) for an unknown
    pixel size or a picture too small to hold one."""
    if not pixel_size_nm:
        return rgb, None
    h, w = rgb.shape[:2]
    bottom = h if bottom is None else bottom
    length = nice_length_nm(pixel_size_nm, w)
    px = int(round(length / pixel_size_nm))
    thick = max(3, h // 100)
    margin = max(6, w // 60)
    text = length_label(length)
    font = _font(max(10, h // 30))
    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    tb = draw.textbbox((0, 0), text, font=font)
    th = tb[3] - tb[1]
    y1 = bottom - margin
    y0 = y1 - thick
    x1 = w - margin
    x0 = x1 - px
    top = y0 - th - 4
    if x0 < margin or top < 0:
        return rgb, None
    pad = 3
    draw.rectangle(
        (min(x0, x1 - (tb[2] - tb[0])) - pad, top - pad, x1 + pad, y1 + pad), fill=(0, 0, 0)
    )
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))
    draw.text((x1 - (tb[2] - tb[0]), top - tb[1]), text, fill=(255, 255, 255), font=font)
    return np.asarray(im), {"length_nm": length, "pixels": px, "label": text}
