"""Microstructure quantities of segmented micrographs (``srpu quantify``).

Per image, over the sample only (a data bar and unlabelled pixels, ``IGNORE_INDEX``, are
no sample), and per sub-dataset:

- **area fractions** of each phase; per sub-dataset their mean over images with a
  Student-t confidence interval (images are the independent samples, pixels are not);
- **particle sizes**: connected components of each phase (``connectivity``), equivalent
  circular diameter d = sqrt(4 A / pi) (scikit-image ``regionprops``). Particles cut by
  the image edge or by unlabelled pixels have an unknown size and are left out of the
  distributions (``exclude_edge_particles``), not out of the counts;
- **interface density** of each phase pair, boundary length per sample area: pixel edges
  between the two phases, each weighted by the boundary's local direction (see
  :func:`interface_lengths_px`): exact for straight boundaries at any angle and for a
  checkerboard, +1.3 % on a disc of radius 40 px, +7 % at 10 px (a digital disc that
  small is not round);
- **triple-phase-boundary density** where there are three or more phases: 2 x 2 pixel
  windows holding three distinct phases, per sample area (points / um^2);
- **connectivity**: the share of each phase in components that touch both opposite
  edges of the sample, and whether the phase percolates along x (left-right) and y
  (top-bottom);
- **tortuosity factor** tau of each phase along x and y, from the steady-state diffusion
  solve of TauFactor (Imperial College's solver, on torch: it runs on the GPU a user has;
  porespy's would pull numba, dask and VTK for the same finite-difference answer). tau
  = eps D0 / D_eff with eps the phase's fraction: 1 for straight channels, larger for
  winding paths, None where the phase does not percolate. Large images are solved on a
  centred crop (``tortuosity_max_px``).

Lengths are in um when the pixel size is known for every image of a group, else in
pixels, and every figure says which.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srpu_pipelines.config import IGNORE_INDEX, QuantifyParams
from srpu_pipelines.errors import InputError, MissingError
from srpu_pipelines.io.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

_NORMAL_SIGMA = 1.0  # px: the smoothing that gives a boundary's local direction


@dataclass
class Micrograph:
    """One segmented image: class indices 0..C-1, ``IGNORE_INDEX`` where no sample."""

    id: str
    dataset: str
    labels: np.ndarray  # uint8 (H, W), the sample above any data bar
    pixel_size_nm: float | None = None


# -- per image ------------------------------------------------------------------------------
def area_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the sample's pixels per phase (sums to 1 over the labelled pixels)."""
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes].astype(np.float64)
    total = counts.sum()
    return counts / total if total else counts


def interface_lengths_px(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) symmetric interface lengths in pixels; pairs with an unlabelled pixel do not
    count. Each pixel edge between phases i and j counts 1 / (|cos t| + |sin t|) with t
    the boundary's local direction, from the gradient of phase i's indicator smoothed
    over ``_NORMAL_SIGMA`` px: a boundary at angle t crosses |cos t| + |sin t| pixel edges
    per unit length, so straight boundaries of any angle come out exact."""
    from scipy.ndimage import gaussian_filter

    c = num_classes
    lab = labels.astype(np.int64)
    grads = []
    for k in range(c):
        sm = gaussian_filter((lab == k).astype(np.float64), _NORMAL_SIGMA, mode="nearest")
        grads.append(np.gradient(sm))  # (d/dy, d/dx)
    total = np.zeros((c, c))
    for axis in (0, 1):
        n = lab.shape[axis] - 1
        first = [slice(None)] * 2
        second = [slice(None)] * 2
        first[axis], second[axis] = slice(0, n), slice(1, n + 1)
        a, b = lab[tuple(first)], lab[tuple(second)]
        keep = (a != b) & (a < c) & (b < c)
        ia, ib = a[keep], b[keep]
        gy, gx = np.zeros(ia.shape), np.zeros(ia.shape)
        for k in np.unique(ia):
            sel = ia == k
            dy, dx = grads[k]
            gy[sel] = (dy[tuple(first)][keep] + dy[tuple(second)][keep])[sel]
            gx[sel] = (dx[tuple(first)][keep] + dx[tuple(second)][keep])[sel]
        mag = np.hypot(gx, gy)
        w = np.where(mag > 1e-12, mag / np.maximum(np.abs(gx) + np.abs(gy), 1e-12), 1.0)
        np.add.at(total, (ia, ib), w)
    return total + total.T


def triple_points(labels: np.ndarray, num_classes: int) -> int:
    """2 x 2 windows, all labelled, that hold three or more distinct phases."""
    if num_classes < 3 or min(labels.shape) < 2:
        return 0
    win = np.stack([labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]], 0).astype(
        np.int16
    )
    labelled = (win < num_classes).all(0)
    s = np.sort(win, 0)
    distinct = 1 + (np.diff(s, axis=0) != 0).sum(0)
    return int(((distinct >= 3) & labelled).sum())


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    from skimage.measure import label

    lab, n = label(mask, connectivity=1 if connectivity == 4 else 2, return_num=True)
    return lab, int(n)


def particles(labels: np.ndarray, cls: int, connectivity: int, min_px: int) -> list[dict[str, Any]]:
    """The phase's particles: area (px), equivalent diameter (px), whether the image edge
    or an unlabelled pixel cuts it (its true size unknown)."""
    from scipy.ndimage import binary_dilation
    from skimage.measure import regionprops

    comp, n = _components(labels == cls, connectivity)
    if not n:
        return []
    cut = binary_dilation(labels == IGNORE_INDEX, np.ones((3, 3), bool))
    cut[0, :] = cut[-1, :] = True
    cut[:, 0] = cut[:, -1] = True
    cut_ids = set(np.unique(comp[cut & (comp > 0)]).tolist())
    out = []
    for r in regionprops(comp):
        if r.area < min_px:
            continue
        out.append(
            {
                "area_px": int(r.area),
                "eq_diameter_px": float(math.sqrt(4.0 * r.area / math.pi)),
                "cut": r.label in cut_ids,
            }
        )
    return out


def spanning(labels: np.ndarray, cls: int, connectivity: int) -> dict[str, Any]:
    """Share of the phase in components that touch both opposite edges, and whether it
    percolates along x (left to right) and y (top to bottom)."""
    comp, n = _components(labels == cls, connectivity)
    total = int((comp > 0).sum())
    if not n:
        return {"spanning_share": 0.0, "percolates_x": False, "percolates_y": False}
    ids_x = np.intersect1d(comp[:, 0], comp[:, -1])
    ids_y = np.intersect1d(comp[0, :], comp[-1, :])
    ids_x, ids_y = ids_x[ids_x > 0], ids_y[ids_y > 0]
    span = np.isin(comp, np.union1d(ids_x, ids_y))
    return {
        "spanning_share": round(float(span.sum()) / total, 6),
        "percolates_x": bool(ids_x.size),
        "percolates_y": bool(ids_y.size),
    }


def _centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return a[y0 : y0 + size, x0 : x0 + size]


def tortuosity(
    labels: np.ndarray, cls: int, axis: str, max_px: int, iter_limit: int, device: str = "cpu"
) -> dict[str, Any]:
    """TauFactor's tortuosity factor of phase ``cls`` for transport along ``axis`` ('x':
    left-right, 'y': top-bottom); unlabelled pixels do not conduct. tau None, with the
    reason, where the phase does not percolate along the axis."""
    import contextlib

    import torch
    from taufactor import Solver

    phase = _centre_crop((labels == cls).astype(np.float32), max_px)
    if axis == "x":
        phase = phase.T
    # TauFactor drives flux along the first axis; the 2-D image is one voxel thick
    if not phase.any() or not spanning(phase.astype(np.uint8), 1, 4)["percolates_y"]:
        return {"tau": None, "why": "does not percolate", "crop": list(phase.shape)}
    solver = Solver(phase[..., None], device=torch.device(device))
    with contextlib.redirect_stdout(io.StringIO()):
        tau = float(solver.solve(iter_limit=iter_limit, verbose=False))
    return {
        "tau": round(tau, 4) if math.isfinite(tau) else None,
        "converged": bool(solver.converged),
        "crop": list(phase.shape if axis == "y" else phase.T.shape),
    }


def measure(m: Micrograph, names: list[str], qp: QuantifyParams) -> dict[str, Any]:
    """Every quantity of one image; lengths in px here (converted per group)."""
    c = len(names)
    lab = m.labels
    sample_px = int((lab < c).sum())
    frac = area_fractions(lab, c)
    inter = interface_lengths_px(lab, c)
    out: dict[str, Any] = {
        "id": m.id,
        "dataset": m.dataset,
        "pixel_size_nm": m.pixel_size_nm,
        "height": int(lab.shape[0]),
        "width": int(lab.shape[1]),
        "sample_px": sample_px,
        "fractions": {n: round(float(f), 6) for n, f in zip(names, frac, strict=True)},
        "interface_px": {
            f"{names[i]}|{names[j]}": round(float(inter[i, j]), 3)
            for i in range(c)
            for j in range(i + 1, c)
        },
        "triple_points": triple_points(lab, c),
        "particles": {},
        "connectivity": {},
        "tortuosity": {},
    }
    for k, n in enumerate(names):
        out["particles"][n] = particles(lab, k, qp.connectivity, qp.min_particle_px)
        out["connectivity"][n] = spanning(lab, k, qp.connectivity)
        if qp.tortuosity and frac[k] > 0:
            out["tortuosity"][n] = {
                ax: tortuosity(lab, k, ax, qp.tortuosity_max_px, qp.tortuosity_iter_limit)
                for ax in ("x", "y")
            }
    return out


# -- per group ------------------------------------------------------------------------------
def mean_ci(
    values: list[float], confidence: float, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Mean and its Student-t confidence interval over images (None below two images),
    clipped to ``bounds`` for a quantity that cannot leave them (a share)."""
    from scipy.stats import t

    v = np.asarray(values, np.float64)
    n = len(v)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": round(mean, 6), "ci": None, "n": 1}
    half = float(t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": round(mean, 6), "ci": [round(lo, 6), round(hi, 6)], "n": n}


def summarize(rows: list[dict[str, Any]], names: list[str], qp: QuantifyParams) -> dict[str, Any]:
    """One group's (a sub-dataset's, or all images') quantities."""
    calibrated = all(r["pixel_size_nm"] for r in rows)
    unit = "um" if calibrated else "px"

    def um(r: dict[str, Any]) -> float:  # length of one pixel in the group's unit
        return r["pixel_size_nm"] / 1000.0 if calibrated else 1.0

    area = sum(r["sample_px"] * um(r) ** 2 for r in rows)
    out: dict[str, Any] = {
        "images": len(rows),
        "length_unit": unit,
        "uncalibrated_images": [r["id"] for r in rows if not r["pixel_size_nm"]],
        "fractions": {n: mean_ci([r["fractions"][n] for r in rows], qp.confidence) for n in names},
        "confidence": qp.confidence,
        "interface_density": {
            pair: round(sum(r["interface_px"][pair] * um(r) for r in rows) / area, 6)
            for pair in rows[0]["interface_px"]
        },
        "interface_density_unit": f"1/{unit}",
        "particles": {},
        "connectivity": {},
        "tortuosity": {},
    }
    if len(names) >= 3:
        out["triple_point_density"] = round(sum(r["triple_points"] for r in rows) / area, 6)
        out["triple_point_density_unit"] = f"1/{unit}^2"
    for n in names:
        all_p = [(p, um(r)) for r in rows for p in r["particles"][n]]
        sized = [
            p["eq_diameter_px"] * s
            for p, s in all_p
            if not (qp.exclude_edge_particles and p["cut"])
        ]
        d = np.asarray(sized)
        out["particles"][n] = {
            "count": len(all_p),
            "sized": len(sized),
            "per_area": round(len(all_p) / area, 6),
            f"eq_diameter_{unit}": {
                "median": round(float(np.median(d)), 4) if d.size else None,
                "mean": round(float(d.mean()), 4) if d.size else None,
                "p10": round(float(np.percentile(d, 10)), 4) if d.size else None,
                "p90": round(float(np.percentile(d, 90)), 4) if d.size else None,
            },
        }
        conn = [r["connectivity"][n] for r in rows]
        out["connectivity"][n] = {
            "spanning_share": mean_ci(
                [c["spanning_share"] for c in conn], qp.confidence, (0.0, 1.0)
            ),
            "percolates_x_share": round(float(np.mean([c["percolates_x"] for c in conn])), 4),
            "percolates_y_share": round(float(np.mean([c["percolates_y"] for c in conn])), 4),
        }
        if qp.tortuosity:
            per_ax = {}
            for ax in ("x", "y"):
                taus = [r["tortuosity"][n][ax]["tau"] for r in rows if n in r["tortuosity"]]
                finite = [t for t in taus if t is not None]
                per_ax[ax] = {
                    **mean_ci(finite, qp.confidence),
                    "not_percolating": len(taus) - len(finite),
                }
            out["tortuosity"][n] = per_ax
    return out


# -- files ----------------------------------------------------------------------------------
def _csv_bytes(header: list[str], rows: Iterable[list[Any]]) -> bytes:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(header)
    wr.writerows(rows)
    return buf.getvalue().encode()


def _per_image_csv(rows: list[dict[str, Any]], names: list[str]) -> bytes:
    pairs = list(rows[0]["interface_px"]) if rows else []
    header = ["id", "dataset", "pixel_size_nm", "sample_px"]
    header += [f"fraction_{n}" for n in names]
    header += [f"interface_length_px_{p.replace('|', '_')}" for p in pairs]
    header += ["triple_points"]
    header += [f"spanning_share_{n}" for n in names]
    header += [f"percolates_{ax}_{n}" for n in names for ax in ("x", "y")]
    header += [f"tau_{ax}_{n}" for n in names for ax in ("x", "y")]
    out = []
    for r in rows:
        line = [r["id"], r["dataset"], r["pixel_size_nm"], r["sample_px"]]
        line += [r["fractions"][n] for n in names]
        line += [r["interface_px"][p] for p in pairs]
        line += [r["triple_points"]]
        line += [r["connectivity"][n]["spanning_share"] for n in names]
        line += [r["connectivity"][n][f"percolates_{ax}"] for n in names for ax in ("x", "y")]
        line += [
            (r["tortuosity"].get(n, {}).get(ax) or {}).get("tau", "")
            for n in names
            for ax in ("x", "y")
        ]
        out.append(line)
    return _csv_bytes(header, out)


def _particles_csv(rows: list[dict[str, Any]], names: list[str]) -> bytes:
    header = ["id", "dataset", "phase", "area_px", "eq_diameter_px", "eq_diameter_um", "cut"]
    out = []
    for r in rows:
        s = r["pixel_size_nm"] / 1000.0 if r["pixel_size_nm"] else None
        for n in names:
            for p in r["particles"][n]:
                d_um = round(p["eq_diameter_px"] * s, 5) if s else ""
                out.append(
                    [
                        r["id"],
                        r["dataset"],
                        n,
                        p["area_px"],
                        round(p["eq_diameter_px"], 3),
                        d_um,
                        p["cut"],
                    ]
                )
    return _csv_bytes(header, out)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(
    rows: list[dict[str, Any]],
    groups: dict[str, dict[str, Any]],
    names: list[str],
    colors: list[tuple[int, int, int]],
    qp: QuantifyParams,
) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = [tuple(v / 255 for v in c) for c in colors]
    out: dict[str, bytes] = {}
    # area fractions with their confidence intervals, per sub-dataset
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups) * len(names) / 2, 3.4))
    width = 0.8 / len(names)
    for k, n in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for g, (_, s) in enumerate(groups.items()):
            f = s["fractions"][n]
            xs.append(g + (k - (len(names) - 1) / 2) * width)
            ys.append(f["mean"])
            lo, hi = f["ci"] if f["ci"] else (f["mean"], f["mean"])
            err[0].append(f["mean"] - lo)
            err[1].append(hi - f["mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, color=rgb[k], edgecolor="k", label=n)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel("area fraction")
    ax.set_title(f"phase fractions (bars: {qp.confidence:.0%} CI over images)")
    ax.legend(fontsize=8)
    out["fractions.png"] = _png(fig)
    plt.close(fig)
    # particle size distributions, one panel per phase, per sub-dataset
    for gname, s in groups.items():
        unit = s["length_unit"]
        members = [r for r in rows if gname == "all" or r["dataset"] == gname]
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
        for k, n in enumerate(names):
            ax = axes[0, k]
            d = [
                p["eq_diameter_px"] * (r["pixel_size_nm"] / 1000.0 if unit == "um" else 1.0)
                for r in members
                for p in r["particles"][n]
                if not (qp.exclude_edge_particles and p["cut"])
            ]
            if d:
                ax.hist(d, bins=qp.histogram_bins, color=rgb[k], edgecolor="k")
            ax.set_title(f"{n} (n={len(d)})", fontsize=9)
            ax.set_xlabel(f"equivalent diameter ({'µm' if unit == 'um' else 'px'})")
        axes[0, 0].set_ylabel("particles")
        fig.suptitle(f"particle sizes: {gname}", fontsize=10)
        out[f"sizes_{gname}.png"] = _png(fig)
        plt.close(fig)
    return out


def quantify(
    micrographs: Iterable[Micrograph],
    names: list[str],
    colors: list[tuple[int, int, int]],
    qp: QuantifyParams,
    out_dir: Path,
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Measure every micrograph, summarise per sub-dataset and over all, and write
    ``quantify.json``, ``per_image.csv``, ``particles.csv`` and the plots to ``out_dir``.
    Re-running on the same masks writes the same bytes."""
    rows = []
    for i, m in enumerate(micrographs):
        rows.append(measure(m, names, qp))
        if on_image is not None:
            on_image(i + 1)
    if not rows:
        raise InputError("quantify: no masks to measure")
    datasets = sorted({r["dataset"] for r in rows})
    groups = {d: summarize([r for r in rows if r["dataset"] == d], names, qp) for d in datasets}
    if len(datasets) > 1:
        groups["all"] = summarize(rows, names, qp)
    doc = {
        "classes": names,
        "settings": qp.model_dump(mode="json"),
        "per_dataset": groups,
        "per_image": [{k: v for k, v in r.items() if k != "particles"} for r in rows],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "per_image.csv", _per_image_csv(rows, names))
    atomic_write_bytes(out_dir / "particles.csv", _particles_csv(rows, names))
    plots = _plots(rows, groups, names, colors, qp)
    for fname, data in plots.items():
        atomic_write_bytes(out_dir / fname, data)
    doc["plots"] = sorted(plots)
    atomic_write_json(out_dir / "quantify.json", doc)  # last: it vouches for the rest
    return doc


# -- where the masks come from -------------------------------------------------------------
def from_labels(items: list[dict[str, Any]], codec: Any) -> Iterable[Micrograph]:
    """The index's labelled masks (``item_mask``: the data bar not labelled), each cut
    above its data bar."""
    from srpu_pipelines.data.masks import item_mask

    for it in items:
        lab = item_mask(it, codec)
        bar = int(it.get("data_bar_rows") or 0)
        yield Micrograph(
            it["id"], it["dataset"], lab[: lab.shape[0] - bar], it.get("pixel_size_nm")
        )


def from_predictions(predict_dir: Path) -> Iterable[Micrograph]:
    """The class-index masks ``srpu predict`` wrote (``predictions.json`` lists them, with
    each image's data bar and pixel size)."""
    from srpu_pipelines.data.imageio import read_raw
    from srpu_pipelines.io.files import read_json

    listing = predict_dir / "predictions.json"
    if not listing.is_file():
        raise MissingError(
            f"quantify.source predictions: {listing} not found; run `srpu predict` first"
        )
    for e in read_json(listing)["predicted"]:
        stem = Path(e["image"]).stem
        lab = read_raw(predict_dir / f"{stem}_pred_index.png", palette="index")
        bar = int(e.get("data_bar_rows") or 0)
        yield Micrograph(
            stem,
            "predictions",
            np.asarray(lab[: lab.shape[0] - bar], np.uint8),
            e.get("pixel_size_nm"),
        )


def flat_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """The headline numbers as MLflow metrics: fraction means, interface and triple-point
    densities, percolation shares and mean tortuosity per group."""
    out: dict[str, float] = {}
    for g, s in doc["per_dataset"].items():
        for n, f in s["fractions"].items():
            if f["mean"] is not None:
                out[f"quantify.{g}.fraction.{n}"] = f["mean"]
        for pair, v in s["interface_density"].items():
            out[f"quantify.{g}.interface_density.{pair.replace('|', '-')}"] = v
        if "triple_point_density" in s:
            out[f"quantify.{g}.triple_point_density"] = s["triple_point_density"]
        for n, c in s["connectivity"].items():
            out[f"quantify.{g}.percolates_x.{n}"] = c["percolates_x_share"]
            out[f"quantify.{g}.percolates_y.{n}"] = c["percolates_y_share"]
        for n, t in s["tortuosity"].items():
            for ax, v in t.items():
                if v["mean"] is not None:
                    out[f"quantify.{g}.tau_{ax}.{n}"] = v["mean"]
    return out
