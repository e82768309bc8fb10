"""Per-pixel uncertainty from class probabilities, and its aggregation per image and tile.

Every map is (H, W) float32 in [0, 1], 1 = most uncertain:
- ``entropy``: Shannon entropy of the softmax over C classes / log C;
- ``least_confidence``: (1 - max p) x C / (C - 1);
- ``margin``: 1 - (p_top1 - p_top2);
- ``variance``: disagreement of M ensemble members (test-time augmentation or MC dropout):
  4 x the mean over classes of the variance of p across members.
A ``boundary_`` strategy is the same map counted only on predicted phase boundaries (pixels
within ``boundary_width`` px of a pixel predicted as another class), where SEM labels are
hardest to paint. Aggregations over a region: ``mean``, ``topk`` (mean of the top
``topk_fraction`` of pixels) and ``class_balanced`` (mean per predicted class, then the mean
over the classes present, so a rare phase counts as much as the matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from srpu_pipelines.config import UNCERTAINTY_STRATEGIES
from srpu_pipelines.errors import InputError

# (probs (C, H, W), member variance (H, W) or None) -> (H, W)
PixelMap = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
AGGREGATIONS = ("mean", "topk", "class_balanced")


def entropy_map(probs: np.ndarray, member_var: np.ndarray | None = None) -> np.ndarray:
    """probs (C, H, W) -> normalised entropy (H, W); one class at a time in float32, so
    a float16 map of a large mosaic is never copied whole at higher precision."""
    h = np.zeros(probs.shape[1:], np.float32)
    for pc in probs:
        p = np.clip(pc.astype(np.float32), 1e-12, 1.0)
        h -= p * np.log(p)
    return np.clip(h / math.log(probs.shape[0]), 0.0, 1.0).astype(np.float32)


def least_confidence_map(probs: np.ndarray, member_var: np.ndarray | None = None) -> np.ndarray:
    c = probs.shape[0]
    top = probs.max(0).astype(np.float32)
    return np.clip((1.0 - top) * c / (c - 1), 0.0, 1.0).astype(np.float32)


def margin_map(probs: np.ndarray, member_var: np.ndarray | None = None) -> np.ndarray:
    top2 = np.sort(probs, axis=0)[-2:].astype(np.float32)
    return np.clip(1.0 - (top2[1] - top2[0]), 0.0, 1.0).astype(np.float32)


def member_variance(members: np.ndarray) -> np.ndarray:
    """members (M, C, H, W) -> (H, W) mean over classes of the variance across members."""
    return members.var(0).mean(0).astype(np.float32)


def variance_map(probs: np.ndarray, member_var: np.ndarray | None = None) -> np.ndarray:
    """4 x the member variance (a variance of probabilities is at most 1/4)."""
    if member_var is None:
        raise InputError(
            "the variance strategy needs at least 2 ensemble members "
            "(active.ensemble.members >= 2 and a method other than none)"
        )
    return np.clip(4.0 * member_var, 0.0, 1.0).astype(np.float32)


PIXEL_MAPS: dict[str, PixelMap] = {
    "entropy": entropy_map,
    "least_confidence": least_confidence_map,
    "margin": margin_map,
    "variance": variance_map,
}
STRATEGIES: tuple[str, ...] = tuple(PIXEL_MAPS) + tuple(f"boundary_{k}" for k in PIXEL_MAPS)
if STRATEGIES != UNCERTAINTY_STRATEGIES:  # params are checked against the config's names
    raise ImportError(f"config.UNCERTAINTY_STRATEGIES {UNCERTAINTY_STRATEGIES} != {STRATEGIES}")


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise InputError(f"unknown uncertainty strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def boundary_mask(labels: np.ndarray, width: int) -> np.ndarray:
    """bool (H, W): pixels within ``width`` px (a square window) of another predicted class."""
    size = 2 * width + 1
    return ndimage.maximum_filter(labels, size=size) != ndimage.minimum_filter(labels, size=size)


def aggregate(
    values: np.ndarray,
    region: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    topk_fraction: float,
) -> dict[str, float]:
    """The three aggregations of ``values`` over the bool ``region`` (0.0 where it is empty:
    no boundary means no boundary uncertainty)."""
    v = values[region]
    if v.size == 0:
        return dict.fromkeys(AGGREGATIONS, 0.0)
    k = max(1, int(math.ceil(topk_fraction * v.size)))
    topk = float(np.partition(v, v.size - k)[v.size - k :].mean())
    lab = labels[region]
    sums = np.bincount(lab, weights=v, minlength=num_classes)
    counts = np.bincount(lab, minlength=num_classes)
    present = counts > 0
    balanced = float((sums[present] / counts[present]).mean())
    return {"mean": float(v.mean()), "topk": topk, "class_balanced": balanced}


def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping (y, x, h, w) tiles covering the image, so no pixel is labelled
    twice. Tiles are ``tile`` px; a remainder of at least half a tile is a smaller tile
    of its own, a smaller one widens the last tile (up to 1.5 x ``tile``)."""

    def spans(n: int) -> list[tuple[int, int]]:
        starts = list(range(0, n, tile))
        if len(starts) > 1 and n - starts[-1] < tile // 2:
            starts.pop()
        ends = starts[1:] + [n]
        return [(a, b - a) for a, b in zip(starts, ends, strict=True)]

    return [(y, x, h, w) for y, h in spans(height) for x, w in spans(width)]


def score_probabilities(
    probs: np.ndarray,
    member_var: np.ndarray | None,
    strategies: list[str],
    boundary_width: int = 3,
    topk_fraction: float = 0.1,
    tiles: list[tuple[int, int, int, int]] | None = None,
    valid: np.ndarray | None = None,
) -> dict:
    """Scores of one image from its probabilities.

    probs (C, H, W) mean prediction; member_var (H, W) from :func:`member_variance` or
    None; ``valid`` bool (H, W)
    pixels that count (None: all; e.g. not the SEM information bar). Returns
    ``{"image": {strategy: {aggregation: value}}, "class_probs": [C],
    "tiles": [{"y","x","h","w", "scores", "class_probs"}], "maps": {base map name: (H, W)}}``;
    ``class_probs`` are the mean class probabilities (expected class shares); the maps are
    what heat maps are drawn from.
    """
    c, h, w = probs.shape
    labels = probs.argmax(0).astype(np.uint8)  # 1 byte a pixel: mosaics are large
    valid = np.ones((h, w), bool) if valid is None else valid
    bases = sorted({s.removeprefix("boundary_") for s in strategies})
    maps = {b: PIXEL_MAPS[b](probs, member_var) for b in bases}
    bwidth = (
        boundary_mask(labels, boundary_width)
        if any(s.startswith("boundary_") for s in strategies)
        else None
    )

    def scores(sl: tuple[slice, slice]) -> dict[str, dict[str, float]]:
        out = {}
        for s in strategies:
            base = s.removeprefix("boundary_")
            region = valid[sl] if base == s else valid[sl] & bwidth[sl]
            out[s] = aggregate(maps[base][sl], region, labels[sl], c, topk_fraction)
        return out

    def class_probs(sl: tuple[slice, slice]) -> list[float]:
        """Mean probability of each class over the valid pixels: the expected class
        shares, which strategy ``rare`` reads (soft, so a class the model rarely predicts
        still shows where it is likeliest)."""
        v = valid[sl]
        if not v.any():
            return [0.0] * c
        if v.all():  # no copy through the mask: mosaics are large
            return [round(float(probs[k][sl].mean(dtype=np.float64)), 6) for k in range(c)]
        return [round(float(probs[k][sl][v].mean(dtype=np.float64)), 6) for k in range(c)]

    full = (slice(0, h), slice(0, w))
    tile_scores = []
    for y, x, th, tw in tiles or []:
        sl = (slice(y, y + th), slice(x, x + tw))
        tile_scores.append(
            {"y": y, "x": x, "h": th, "w": tw, "scores": scores(sl), "class_probs": class_probs(sl)}
        )
    return {
        "image": scores(full),
        "class_probs": class_probs(full),
        "tiles": tile_scores,
        "maps": maps,
    }
