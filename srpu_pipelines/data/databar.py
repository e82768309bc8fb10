"""The instrument's data bar: the band at the bottom of many SEM images with text, a
scale bar and a logo on a white or black background (Zeiss, FEI/Thermo, Hitachi, JEOL).

A row belongs to a bar when nearly all its pixels are saturated (the background and the
lettering), unlike the continuous grey of a micrograph; the band of such rows at the
bottom is a bar only when it holds lettering, both near-black and near-white pixels,
and is a plausible height. A uniform dark region at the bottom (a substrate, sample) is
saturated but has no lettering, so it is not a bar; neither is a whole image of one
colour. FEI files say it in a tag (``Image.ResolutionY``, the height above the bar),
which the caller prefers (``data/calibration.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DARK, BRIGHT = 0.06, 0.94  # saturated: within 6 % of the image's black or white
ROW_SATURATED = 0.75  # share of saturated pixels from which a row looks like a bar's
LETTERING = 0.01  # share of near-black and of near-white pixels a bar's band holds
FRAME_ROWS = 3  # a frame line or two below the bar (Zeiss) may look like neither
GAP_ROWS = 2  # rows inside the bar that may fail (a thick glyph across the row)
MIN_ROWS, MAX_SHARE = 8, 0.25  # a bar is at least 8 rows and at most 25 % of the height


def _unit(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(-1)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def detect_bar(img: np.ndarray) -> dict[str, Any]:
    """``{"rows": N, "why": ...}``: the number of rows at the bottom that are the data
    bar (0 when there is none) and the evidence."""
    a = _unit(img)
    h = a.shape[0]
    dark, bright = a <= DARK, a >= BRIGHT
    sat = (dark | bright).mean(1)
    barlike = sat >= ROW_SATURATED
    r = h - 1
    skipped = 0
    while r >= 0 and not barlike[r] and skipped < FRAME_ROWS:
        r, skipped = r - 1, skipped + 1
    if r < 0 or not barlike[r]:
        return {"rows": 0, "why": "no saturated band at the bottom"}
    top, gap = r, 0
    while r > 0:
        r -= 1
        if barlike[r]:
            top, gap = r, 0
        else:
            gap += 1
            if gap > GAP_ROWS:
                break
    rows = h - top
    band = slice(top, h)
    d, b = float(dark[band].mean()), float(bright[band].mean())
    evidence = f"{rows} saturated rows at the bottom, {d:.0%} near-black and {b:.0%} near-white"
    if rows > MAX_SHARE * h:
        return {"rows": 0, "why": f"{evidence}: over {MAX_SHARE:.0%} of the height, not a bar"}
    if rows < MIN_ROWS:
        return {"rows": 0, "why": f"{evidence}: under {MIN_ROWS} rows, not a bar"}
    if min(d, b) < LETTERING:
        return {"rows": 0, "why": f"{evidence}: no lettering (one tone), sample, not a bar"}
    return {"rows": rows, "why": f"{evidence}: lettering on a uniform band"}
