"""Rounds: what a person gets to correct, and what comes back.

Round N lives in ``active.out_dir/rounds/round_NNN/``, one folder per sub-dataset, and
holds for each selected item:
- ``NAME.ext``: the image (a copy of the pool file; a tile is cut out and saved as TIFF at
  its original bit depth);
- ``NAME_mask.png``: the champion's prediction as a colour mask in the params colours, at
  full size: correct it in ImageJ or any painter, keep the name, and put both files into
  the sub-dataset's labelled folder;
- ``NAME_uncertainty.png``: a heat map of the pixel uncertainty (bright = unsure);
- ``predicted/NAME_mask.png``: the untouched prediction, to measure the correction effort;
and ``selection_summary.json`` (item, scores per strategy, rank, model, round).

Selecting again with the same model and the same labelled data returns the open round
instead of writing a new one, so re-running the step changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from srpu_pipelines.config import Params
from srpu_pipelines.data.discovery import SIDECARS, Pair, Problem, find_labeled
from srpu_pipelines.data.imageio import read_raw
from srpu_pipelines.data.masks import MaskCodec, item_mask
from srpu_pipelines.io.faults import fault_point
from srpu_pipelines.io.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    read_json,
    sha256_file_cached,
)

log = logging.getLogger(__name__)
_ROUND = re.compile(r"^round_(\d{3,})$")


def rounds_dir(params: Params) -> Path:
    return Path(params.active.out_dir) / "rounds"


def round_folders(params: Params) -> list[tuple[int, Path]]:
    """(number, folder) of every round with a summary, oldest first."""
    root = rounds_dir(params)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _ROUND.match(d.name)
        if m and (d / "selection_summary.json").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def load_summary(folder: Path) -> dict[str, Any]:
    return read_json(folder / "selection_summary.json")


def labeled_revision(index: dict[str, Any]) -> str:
    """Hash of the labelled set (ids and mask contents): a new or changed label changes it."""
    h = hashlib.sha256()
    for it in sorted(index["items"], key=lambda it: it["id"]):
        h.update(f"{it['id']}\0{it['mask_sha256']}\n".encode())
    return h.hexdigest()[:16]


def awaiting_ids(params: Params, index: dict[str, Any]) -> set[str]:
    """Items selected in one of the last ``active.await_rounds`` rounds whose corrected
    mask has not been indexed yet. Older unlabelled picks are offered again: a person may
    have skipped them."""
    labeled = {it["id"] for it in index["items"]}
    out: set[str] = set()
    for _, folder in round_folders(params)[-params.active.await_rounds :]:
        out |= {s["id"] for s in load_summary(folder)["selected"]} - labeled
    return out


def open_round(params: Params, model_key: str, revision: str) -> tuple[int, Path] | None:
    """The latest round when it was made by this model from this labelled set."""
    rounds = round_folders(params)
    if not rounds:
        return None
    n, folder = rounds[-1]
    s = load_summary(folder)
    if s.get("model_key") == model_key and s.get("labeled_revision") == revision:
        return n, folder
    return None


def _save_png(path: Path, arr: np.ndarray) -> None:
    atomic_write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def heat_map(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> uint8 (H, W, 3) with matplotlib's 'inferno' (bright = unsure)."""
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.clip(values, 0.0, 1.0))[..., :3]
    return (rgb * 255).astype(np.uint8)


def _write_image(item: dict[str, Any], dest_dir: Path) -> Path:
    """The image a person labels: the pool file itself (with its calibration sidecar, if
    any), or the tile cut from it; a tile of a calibrated image carries its parent's pixel
    size in a ``NAME.txt`` sidecar (``PixelSize=`` in nm, read back by ``srpu index``)."""
    src = Path(item["image"])
    if item["box"] is None:
        dest = dest_dir / f"{item['name']}{src.suffix}"
        atomic_write_with(dest, lambda tmp: shutil.copyfile(src, tmp))
        for side in SIDECARS:
            if src.with_suffix(side).is_file():
                s = src.with_suffix(side)
                atomic_write_with(dest.with_suffix(side), lambda tmp, s=s: shutil.copyfile(s, tmp))
        return dest
    import tifffile

    y, x, h, w = item["box"]
    crop = np.ascontiguousarray(read_raw(src)[y : y + h, x : x + w])
    dest = dest_dir / f"{item['name']}.tif"
    atomic_write_with(dest, lambda tmp: tifffile.imwrite(tmp, crop))
    if item.get("pixel_size_nm"):
        text = (
            f"[SemImageFile]\nPixelSize={item['pixel_size_nm']:.6g}\nSrpuTileOf={src.name}\n"
            f"SrpuTileBox={y},{x},{h},{w}\n"
        )
        atomic_write_bytes(dest.with_suffix(".txt"), text.encode())
    return dest


def write_round(
    params: Params,
    selected: list[dict[str, Any]],
    predict: Any,
    model_key: str,
    revision: str,
    cold: bool,
) -> tuple[int, Path, dict[str, Any]]:
    """Write the next round's folder. ``predict(item)`` returns (labels uint8 (H, W),
    uncertainty (H, W) in [0, 1]) for the item's image or tile, or None in a cold start
    (no model: the person paints from scratch). Returns (number, folder, summary)."""
    rounds = round_folders(params)
    number = rounds[-1][0] + 1 if rounds else 1
    folder = rounds_dir(params) / f"round_{number:03d}"
    if folder.exists():  # no summary: a write that was interrupted, never handed over
        log.warning("%s: an interrupted round folder (no summary); written afresh", folder)
        shutil.rmtree(folder)
    codec = MaskCodec.from_params(params)
    files = []
    for item in selected:
        d = folder / item["dataset"]
        entry: dict[str, Any] = {"image_file": str(_write_image(item, d))}
        pred = predict(item)
        if pred is not None:
            labels, unc = pred
            mask = d / f"{item['name']}{params.mask.suffix}.png"
            # in the data set's own mask encoding, so that the corrected file indexes
            codec.save_png(mask, labels)
            codec.save_png(d / "predicted" / mask.name, labels)
            _save_png(d / f"{item['name']}_uncertainty.png", heat_map(unc))
            counts = np.bincount(labels.ravel(), minlength=256)[: codec.num_classes]
            fractions = counts / max(int(counts.sum()), 1)  # of the sample: the bar is none
            entry.update(
                mask_file=str(mask),
                uncertainty_file=str(d / f"{item['name']}_uncertainty.png"),
                predicted_fractions={
                    n: round(float(f), 4)
                    for n, f in zip(params.class_names, fractions, strict=True)
                },
            )
        files.append({**item, **entry})
        fault_point("round:item")
    summary = {
        "round": number,
        "model_key": model_key,
        "labeled_revision": revision,
        "cold_start": cold,
        "unit": params.active.unit,
        "aggregation": params.active.aggregation,
        "weights": params.active.weights,
        "diversity": params.active.diversity,
        "selected": files,
        "how_to": (
            f"Correct each NAME{params.mask.suffix}.png (or paint one, in a cold start) in the "
            "class colours, then put NAME.ext, the mask and NAME.txt where there is one (it "
            "carries the pixel size) into the labelled folder of the item's sub-dataset (the "
            "folder name here). Keep the file names. Pixels in the ignore colour (the data "
            "bar) are not sample: leave them so."
        ),
    }
    atomic_write_json(folder / "selection_summary.json", summary)  # last: marks it complete
    return number, folder, summary


# -- what comes back -------------------------------------------------------------------------
def new_labels(
    params: Params, index: dict[str, Any]
) -> tuple[list[Pair], list[Pair], list[Problem]]:
    """Labelled pairs on disk that the index does not hold yet, and indexed pairs whose
    mask has changed since, each validated like the index does (decodes to classes, same
    size as its image); and the problems (a mask without its image, an image without a
    mask, an invalid mask). Returns (new, changed, problems)."""
    from srpu_pipelines.data.index import check_pair

    codec = MaskCodec.from_params(params)
    known = {it["id"]: it for it in index["items"]}
    new: list[Pair] = []
    changed: list[Pair] = []
    problems: list[Problem] = []
    for spec in params.data.datasets:
        found, pr = find_labeled(spec, params.mask.suffix)
        problems += pr
        for p in found:
            old = known.get(p.id)
            if old is not None and old["mask_sha256"] == sha256_file_cached(p.mask):
                continue
            _, prob = check_pair(p, codec)
            if prob:
                problems.append(prob)
            else:
                (new if old is None else changed).append(p)
    return new, changed, problems


def correction_effort(params: Params, index: dict[str, Any]) -> list[dict[str, Any]]:
    """For every selected item that has been labelled: Dice between the predicted and the
    corrected mask, mean over classes present in either (1 = accepted as predicted)."""
    codec = MaskCodec.from_params(params)
    items = {it["id"]: it for it in index["items"]}
    out = []
    for n, folder in round_folders(params):
        for s in load_summary(folder)["selected"]:
            it = items.get(s["id"])
            if it is None or "mask_file" not in s:
                continue
            pred_file = Path(s["mask_file"]).parent / "predicted" / Path(s["mask_file"]).name
            if not pred_file.is_file():
                continue
            pred = codec.decode_file(pred_file)
            true = item_mask(it, codec)
            if pred.shape != true.shape:
                continue
            dice = []
            for k in range(codec.num_classes):
                a, b = pred == k, true == k
                valid = true != 255
                a, b = a & valid, b & valid
                if a.any() or b.any():
                    dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
            out.append({"round": n, "id": s["id"], "dice": round(float(np.mean(dice)), 4)})
    return out
