"""Synthetic SEM micrographs of a 3-phase battery electrode, with exact masks.

Phases: active-material particles (bright, rounded, tens of pixels), solid electrolyte
(mid-grey binder filling the space between), carbon additive (small dark clusters
sitting mostly on particle surfaces). Rendered like a secondary-electron image: grain
texture, edge brightening, blur, shot noise, a charging gradient, and an information
bar at the bottom whose pixels are marked 'not labelled' in the mask.
Deterministic: the same seed, sub-dataset and name give the same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from srpu_pipelines.config import IGNORE_INDEX, Params
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.errors import InputError
from srpu_pipelines.io.files import atomic_write_with

AM, SE, CARBON = 0, 1, 2  # class indices in the demo params


@dataclass(frozen=True)
class Style:
    """Per-chemistry look: particle size and density, contrast, 16-bit output."""

    radius: tuple[float, float]
    fill: float
    levels: tuple[float, float, float]  # mean grey of AM, SE, carbon
    sixteen_bit: bool


STYLES = (
    Style(radius=(0.06, 0.12), fill=0.45, levels=(0.72, 0.45, 0.18), sixteen_bit=False),
    Style(radius=(0.035, 0.07), fill=0.40, levels=(0.62, 0.40, 0.12), sixteen_bit=True),
)


def _rng(seed: int, *keys: str) -> np.random.Generator:
    digest = hashlib.sha256(":".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    n = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return n / (n.std() + 1e-6)


def render(
    rng: np.random.Generator, height: int, width: int, style: Style, info_bar: int
) -> tuple[np.ndarray, np.ndarray]:
    """One micrograph: float32 (H, W) in [0, 1] and uint8 (H, W) class indices."""
    h = height - info_bar
    labels = np.full((h, width), SE, np.uint8)
    scale = min(h, width)
    yy, xx = np.mgrid[0:h, 0:width].astype(np.float32)
    # Active material: overlapping, slightly elliptical particles until the target fill.
    for _ in range(400):
        if (labels == AM).mean() >= style.fill:
            break
        r = rng.uniform(*style.radius) * scale
        cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * width, 1.1 * width)
        a, e = rng.uniform(0, np.pi), rng.uniform(0.75, 1.0)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(a) + dy * np.sin(a)
        v = (-dx * np.sin(a) + dy * np.cos(a)) / e
        wobble = 1 + 0.08 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6.3))
        labels[u * u + v * v < (r * wobble) ** 2] = AM
    # Carbon: small clusters, mostly on AM / SE boundaries.
    edges = cv2.morphologyEx((labels == AM).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3)))
    ey, ex = np.nonzero(edges)
    n_clusters = max(2, int(rng.integers(8, 16) * (h * width) / 256**2))
    for _ in range(n_clusters):
        if len(ey) and rng.random() < 0.8:
            k = rng.integers(len(ey))
            cy, cx = ey[k], ex[k]
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, width)
        for _ in range(int(rng.integers(2, 6))):
            r = max(1.5, rng.uniform(0.008, 0.02) * scale)
            oy, ox = rng.normal(0, 2.5 * r, 2)
            labels[(yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 < r * r] = CARBON

    lv = np.array(style.levels, np.float32)
    img = lv[labels]
    img += 0.05 * _smooth_noise(rng, h, width, 1.5)  # grain
    img += 0.03 * _smooth_noise(rng, h, width, 6.0)
    am = (labels == AM).astype(np.float32)
    dist = cv2.distanceTransform((am > 0).astype(np.uint8), cv2.DIST_L2, 3)
    img += 0.12 * np.exp(-dist / 2.0) * am  # SE edge effect: bright particle rims
    gy, gx = rng.uniform(-1, 1, 2)
    img += 0.08 * (gy * (yy / h - 0.5) + gx * (xx / width - 0.5))  # charging gradient
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    img = rng.poisson(np.clip(img, 0, 1) * 120.0) / 120.0  # shot noise
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)

    full = np.zeros((height, width), np.float32)
    mask = np.full((height, width), IGNORE_INDEX, np.uint8)
    full[:h], mask[:h] = img, labels
    if info_bar:
        bar = full[h:]
        bar[:] = 0.02
        x = int(0.04 * width)
        for _ in range(6):  # text-like blocks and a scale bar
            bw = int(rng.integers(4, max(5, width // 12)))
            bar[info_bar // 3 : info_bar // 3 * 2, x : x + bw] = 0.95
            x += bw + int(rng.integers(3, 8))
        bar[info_bar // 2 - 1 : info_bar // 2 + 1, width - width // 4 : width - 8] = 0.95
    return full, mask


def _save_grey(path: Path, img: np.ndarray, sixteen_bit: bool) -> None:
    if sixteen_bit:
        arr = np.round(img * 65535).astype(np.uint16)
        atomic_write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="TIFF"))
    else:
        arr = np.round(img * 255).astype(np.uint8)
        atomic_write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _save_rgb(path: Path, rgb: np.ndarray) -> None:
    atomic_write_with(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def generate_demo(params: Params) -> dict[str, int]:
    """Write the demo data set under ``demo.out_dir``; existing files are kept, never replaced.

    Layout: ``labeled/<dataset>/NAME.(png|tif)`` + ``NAME_mask.png``, ``raw/<dataset>/`` (the
    unlabelled pool), ``predict/`` (images of other sizes for inference).
    Returns counts of files written and kept.
    """
    d = params.demo
    if params.num_classes != 3:
        raise InputError("demo data has 3 phases: params.classes must list 3 classes")
    codec = MaskCodec.from_params(params)
    if codec.ignore_color is None and d.info_bar:
        raise InputError("demo.info_bar > 0 needs mask.ignore_color to mark the bar as unlabelled")
    root = Path(d.out_dir)
    written = kept = 0

    def emit(path: Path, save, *args) -> None:
        nonlocal written, kept
        if path.exists():
            kept += 1  # a label may have been corrected by hand: never overwrite it
            return
        save(path, *args)
        written += 1

    for k, ds in enumerate(d.datasets):
        style = STYLES[k % len(STYLES)]
        ext = ".tif" if style.sixteen_bit else ".png"
        for i in range(d.labeled_per_dataset):
            name = f"{ds}_{i:03d}"
            img, mask = render(_rng(params.seed, ds, name), d.size, d.size, style, d.info_bar)
            folder = root / "labeled" / ds
            emit(folder / f"{name}{ext}", _save_grey, img, style.sixteen_bit)
            emit(folder / f"{name}{params.mask.suffix}.png", _save_rgb, codec.to_color(mask))
        for i in range(d.pool_per_dataset):
            name = f"{ds}_pool_{i:03d}"
            img, _ = render(_rng(params.seed, ds, name), d.size, d.size, style, d.info_bar)
            emit(root / "raw" / ds / f"{name}{ext}", _save_grey, img, style.sixteen_bit)
    for i in range(d.predict_images):
        style = STYLES[i % len(STYLES)]
        h, w = d.size + 40 * (i + 1), d.size + 72 * (i + 1)  # not tile-sized on purpose
        img, _ = render(_rng(params.seed, "predict", str(i)), h, w, style, d.info_bar)
        emit(root / "predict" / f"new sample {i}.png", _save_grey, img, False)
    return {"written": written, "kept": kept}
