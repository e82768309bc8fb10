"""The data fingerprint: what a training plan needs to know about the labelled images.

Per image (computed once, when the index is built, and stored in the index entry beside
the mask's hash): bit depth, intensity statistics and, per class, the connected objects
(8-connected) with their count, pixel area, thickness (twice the distance to the nearest
other pixel along the object's ridge, minus one: a line 3 px wide measures 3) and extent
(the longer side of its bounding box). :func:`fingerprint` combines the images of a
selection into figures per sub-dataset and over all, weighting each image's object
figures by its pixels of that class (so one large image counts as much as its pixels).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from srpu_pipelines.errors import InputError

FINGERPRINT_VERSION = 1
_EIGHT = np.ones((3, 3), dtype=bool)


def image_stats(raw: np.ndarray, grey: np.ndarray) -> dict[str, Any]:
    """``raw``: the file's array (its dtype gives the bit depth); ``grey``: (H, W) float in
    [0, 1]. Intensities are on the 0..1 scale of the file's full range."""
    bits = 8 * raw.dtype.itemsize if raw.dtype != bool else 1
    q = np.percentile(grey, [1, 50, 99])
    return {
        "bit_depth": int(bits),
        "mean": round(float(grey.mean()), 5),
        "std": round(float(grey.std()), 5),
        "p01": round(float(q[0]), 5),
        "p50": round(float(q[1]), 5),
        "p99": round(float(q[2]), 5),
    }


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order].astype(np.float64)
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, 0.5 * cum[-1])])


def class_objects(mask: np.ndarray, c: int) -> dict[str, Any] | None:
    """Object statistics of class ``c`` in a (H, W) index mask (255 = not labelled), or
    None when the class is absent. Area-weighted medians: a phase is described by the
    objects that hold most of its pixels, not by specks of paint."""
    b = mask == c
    if not b.any():
        return None
    lab, n = ndi.label(b, structure=_EIGHT)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    dt = ndi.distance_transform_edt(b)
    ridge = b & (dt >= ndi.maximum_filter(dt, size=3))
    t_sum = np.bincount(lab[ridge], weights=2 * dt[ridge] - 1, minlength=n + 1)[1:]
    t_cnt = np.bincount(lab[ridge], minlength=n + 1)[1:]
    thick = t_sum / np.maximum(t_cnt, 1)
    extent = np.array(
        [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndi.find_objects(lab)],
        dtype=np.float64,
    )
    # elongation = length / thickness, with length = area / thickness
    elong = areas / np.maximum(thick, 1.0) ** 2
    return {
        "pixels": int(areas.sum()),
        "count": int(n),
        "median_area": float(np.median(areas)),
        "thickness": round(_weighted_median(thick, areas), 3),
        "extent": round(_weighted_median(extent, areas), 1),
        "elongation": round(_weighted_median(elong, areas), 2),
        "anisotropy": round(_anisotropy(b), 3),
    }


def _anisotropy(b: np.ndarray) -> float:
    """How much the class's boundaries share one direction, 0 (any direction, as for round
    particles) to 1 (all parallel, as for a layer across the image): the coherence of the
    structure tensor of the class indicator, summed over the image."""
    f = b.astype(np.float32)
    gy, gx = np.gradient(f)
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    tr = jxx + jyy
    if tr <= 0:
        return 0.0
    return float(np.hypot(jxx - jyy, 2 * jxy) / tr)


def mask_stats(mask: np.ndarray, num_classes: int) -> list[dict[str, Any] | None]:
    """Per class (index order) the object statistics of one mask."""
    return [class_objects(mask, c) for c in range(num_classes)]


def _combine(per_image: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One figure set from several images' stats."""
    heights = [s["height"] for s in per_image]
    widths = [s["width"] for s in per_image]
    img = [s["image"] for s in per_image]
    labelled = float(sum(sum(o["pixels"] for o in s["objects"] if o) for s in per_image))
    classes: dict[str, Any] = {}
    for c, name in enumerate(names):
        objs = [s["objects"][c] for s in per_image if s["objects"][c]]
        if not objs:
            classes[name] = {"share": 0.0, "images": 0}
            continue
        w = np.array([o["pixels"] for o in objs], dtype=np.float64)
        counts = np.array([o["count"] for o in objs], dtype=np.float64)

        def wmean(key: str, objs: list = objs, w: np.ndarray = w) -> float:
            return float(np.average([o[key] for o in objs], weights=w))

        classes[name] = {
            "share": round(float(w.sum()) / max(labelled, 1.0), 6),
            "images": len(objs),
            "objects_per_image": round(float(counts.mean()), 2),
            "median_area": round(
                _weighted_median(np.array([o["median_area"] for o in objs]), counts), 1
            ),
            "thickness": round(wmean("thickness"), 2),
            "extent": round(wmean("extent"), 1),
            "elongation": round(wmean("elongation"), 2),
            "anisotropy": round(wmean("anisotropy"), 3),
        }
    return {
        "images": len(per_image),
        "height": {"min": min(heights), "median": int(np.median(heights)), "max": max(heights)},
        "width": {"min": min(widths), "median": int(np.median(widths)), "max": max(widths)},
        "bit_depth": sorted({i["bit_depth"] for i in img}),
        "intensity": {
            "mean": round(float(np.mean([i["mean"] for i in img])), 4),
            "std": round(float(np.mean([i["std"] for i in img])), 4),
            # spread of brightness and contrast between images (sessions, detectors)
            "mean_spread": round(float(np.std([i["mean"] for i in img])), 4),
            "std_spread": round(float(np.std([i["std"] for i in img])), 4),
        },
        "classes": classes,
    }


def fingerprint(
    items: list[dict[str, Any]],
    class_names: list[str],
    pixel_sizes_nm: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """The fingerprint of index ``items`` (entries with ``stats``), over all and per
    sub-dataset; ``pixel_sizes_nm`` per sub-dataset where known (None: unknown).

    Raises ValueError naming an item without stats (an index from an older SRPU)."""
    if not items:
        raise InputError("fingerprint: no labelled images selected")
    per: list[dict[str, Any]] = []
    for it in items:
        st = it.get("stats")
        if not st or st.get("version") != FINGERPRINT_VERSION:
            raise InputError(
                f"index entry {it.get('id')!r} has no fingerprint statistics (an index "
                "written by an older SRPU): run `srpu index` again"
            )
        per.append({"height": it["height"], "width": it["width"], **st, "dataset": it["dataset"]})
    sizes = pixel_sizes_nm or {}
    datasets = sorted({p["dataset"] for p in per})
    out = _combine(per, class_names)
    out["datasets"] = {
        d: {
            **_combine([p for p in per if p["dataset"] == d], class_names),
            **_pixel_size(sizes.get(d), [it for it in items if it["dataset"] == d]),
        }
        for d in datasets
    }
    out["version"] = FINGERPRINT_VERSION
    out["mask_sha256"] = hashlib.sha256(
        json.dumps(sorted(it["mask_sha256"] for it in items)).encode()
    ).hexdigest()
    return out


def _pixel_size(override: float | None, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A sub-dataset's pixel size: the params override, else the median of its images'
    own calibrations (with their spread and how many images have one)."""
    known = [it["pixel_size_nm"] for it in items if it.get("pixel_size_nm")]
    if override is not None:
        return {"pixel_size_nm": override, "pixel_size_from": "params"}
    if not known:
        return {"pixel_size_nm": None, "pixel_size_from": "unknown"}
    return {
        "pixel_size_nm": round(float(np.median(known)), 6),
        "pixel_size_from": f"the images' calibration ({len(known)} of {len(items)})",
        "pixel_size_range_nm": [round(min(known), 6), round(max(known), 6)],
    }


def item_stats(raw: np.ndarray, grey: np.ndarray, mask: np.ndarray, num_classes: int) -> dict:
    """What an index entry stores: ``{"version", image stats..., "objects": [...]}``."""
    return {
        "version": FINGERPRINT_VERSION,
        "image": image_stats(raw, grey),
        "objects": mask_stats(mask, num_classes),
    }
