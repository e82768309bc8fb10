"""Evaluation on full-size images and inference on a folder of new images."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from srpu_pipelines.analysis.inference import input_scale, predict_labels
from srpu_pipelines.analysis.metrics import ConfusionAccumulator
from srpu_pipelines.analysis.scalebar import draw_scale_bar
from srpu_pipelines.compute.device import Runtime, prepare_module, resolve_runtime
from srpu_pipelines.config import InferenceParams, Params
from srpu_pipelines.data.calibration import calibrate
from srpu_pipelines.data.dataset import load_samples, standardize, stretch
from srpu_pipelines.data.discovery import SIDECARS
from srpu_pipelines.data.imageio import ImageReadError, is_image_file, read_grey
from srpu_pipelines.data.index import select_items
from srpu_pipelines.data.masks import MaskCodec, with_bar
from srpu_pipelines.errors import InputError, MissingError
from srpu_pipelines.io.files import atomic_write_json, atomic_write_with
from srpu_pipelines.models.checkpoint import load_model

log = logging.getLogger(__name__)


def load_checked(params: Params, checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint, check that it was trained for ``params.classes``, and put it on
    the device of ``params.inference`` (eval mode)."""
    model, cfg = load_model(checkpoint)
    if cfg["class_names"] != params.class_names:
        raise InputError(
            f"{checkpoint}: trained for classes {cfg['class_names']}, params.classes are "
            f"{params.class_names}"
        )
    rt = inference_runtime(params.inference)
    prepare_module(model, rt.device, rt.channels_last)
    return model, cfg


def inference_runtime(inf: InferenceParams) -> Runtime:
    return resolve_runtime(inf.device, inf.precision, inf.channels_last, "inference")


def _predict(
    model, cfg: dict, image01: np.ndarray, params: Params, pixel_size_nm: float | None = None
) -> np.ndarray:
    """Labels of a [0, 1] image at its own pixels; a model trained on resampled pixels
    (``resample_nm`` in its config) sees the image resampled to them when its pixel size
    is known."""
    inf = params.inference
    rt = inference_runtime(inf)
    return predict_labels(
        model,
        standardize(image01),
        input_scale(cfg, pixel_size_nm),
        tile=inf.tile_size,
        overlap=inf.overlap,
        batch_size=inf.batch_size,
        precision=rt.precision,
        in_channels=cfg["in_channels"],
        channels_last=rt.channels_last,
        flips=inf.tta == "flips",
    )


def _hatch(rgb: np.ndarray, rows: int) -> np.ndarray:
    """The bottom ``rows`` of ``rgb`` striped grey and dark: 'not sample' at a glance."""
    if rows <= 0:
        return rgb
    rgb = rgb.copy()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[h - rows : h, 0:w]
    rgb[h - rows :] = np.where((((yy + xx) // 6) % 2 == 0)[..., None], 150, 60).astype(np.uint8)
    return rgb


def overlay_figure(
    image01: np.ndarray,
    truth_rgb: np.ndarray | None,
    pred_rgb: np.ndarray,
    alpha: float = 0.45,
    bar_rows: int = 0,
    pixel_size_nm: float | None = None,
) -> np.ndarray:
    """uint8 (H, nW + gaps, 3): image | truth over image (when given) | prediction over
    image. The data bar's ``bar_rows`` stay as imaged in the first panel and are hatched
    as 'not sample' in the others; a scale bar (when ``pixel_size_nm`` is known) sits on
    the first panel above the data bar."""
    grey = np.repeat((np.clip(image01, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)

    def blend(rgb: np.ndarray) -> np.ndarray:
        return _hatch((grey * (1 - alpha) + rgb * alpha).astype(np.uint8), bar_rows)

    first, _ = draw_scale_bar(grey, pixel_size_nm, grey.shape[0] - bar_rows)
    gap = np.full((grey.shape[0], 6, 3), 255, np.uint8)
    panels = [first] + ([gap, blend(truth_rgb)] if truth_rgb is not None else [])
    return np.concatenate([*panels, gap, blend(pred_rgb)], axis=1)


def save_label_files(out: Path, stem: str, pred: np.ndarray, codec: MaskCodec) -> None:
    """``STEM_pred.png`` (colour mask, ready to correct in a painter), ``STEM_pred_index.png``
    (an indexed PNG: pixel value = class, with the class colours as its palette) and
    ``STEM_labels.tif`` (the same as a palette TIFF, which Fiji opens as an indexed image
    and napari, reading the raw values, as labels). 'Not sample' is ``IGNORE_INDEX``."""
    import tifffile

    _save_png(out / f"{stem}_pred.png", codec.to_color(pred))
    indexed = codec.indexed_image(pred)
    atomic_write_with(out / f"{stem}_pred_index.png", lambda t: indexed.save(t, format="PNG"))
    lut = codec.to_color(np.arange(256, dtype=np.uint8)[None])[0]  # (256, 3)
    cmap = lut.T.astype(np.uint16) * 257  # (3, 256), 16-bit as TIFF colormaps are
    atomic_write_with(
        out / f"{stem}_labels.tif",
        lambda tmp: tifffile.imwrite(
            tmp, pred, photometric="palette", colormap=cmap, compression="zlib"
        ),
    )


def _save_png(path: Path, arr: np.ndarray) -> None:
    atomic_write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _safe_name(item_id: str) -> str:
    return item_id.replace("/", "__")


def evaluate_checkpoint(
    params: Params,
    index: dict[str, Any],
    checkpoint: str | Path,
    split: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-class IoU and Dice (overall and per sub-dataset) on ``split``; overlays saved.

    Writes ``metrics.json`` and ``overlays/*.png`` under ``out_dir`` and returns the metrics.
    """
    split = split or params.evaluate.split
    out = Path(out_dir or params.evaluate.out_dir)
    items = select_items(index, [split])
    if not items:
        raise InputError(f"evaluate.split {split!r}: no labelled images in this split")
    model, cfg = load_checked(params, checkpoint)
    codec = MaskCodec.from_params(params)
    by_id = {it["id"]: it for it in items}
    # overlays of an earlier evaluation (another split, more pictures) would pass as new
    for old in (out / "overlays").glob("*.png"):
        old.unlink()
    overlay_files: list[str] = []
    overall = ConfusionAccumulator(params.num_classes)
    per_ds: dict[str, ConfusionAccumulator] = {}
    per_image = []
    shown = 0
    for s in tqdm(
        load_samples(items, codec, "load", progress),
        desc=f"evaluate {split}",
        disable=not progress,
        unit="img",
    ):
        # the sample above the data bar, at the file's own pixels
        pred = _predict(model, cfg, s.image, params, s.pixel_size_nm)
        overall.update(pred, s.mask)
        per_ds.setdefault(s.dataset, ConfusionAccumulator(params.num_classes)).update(pred, s.mask)
        one = ConfusionAccumulator(params.num_classes)
        one.update(pred, s.mask)
        sc = one.scores(params.class_names)
        per_image.append({"id": s.id, "miou": sc["miou"], "iou": sc["iou"]})
        if shown < params.evaluate.overlays:
            item = by_id[s.id]
            full = read_grey(Path(item["image"]))  # the whole file, its bar included
            bar = s.bar_rows
            fig = overlay_figure(
                np.vstack([s.image, stretch(full[full.shape[0] - bar :])]) if bar else s.image,
                codec.to_color(with_bar(s.mask, s.mask.shape[0] + bar, bar)),
                codec.to_color(with_bar(pred, pred.shape[0] + bar, bar)),
                bar_rows=bar,
                pixel_size_nm=item.get("pixel_size_nm"),
            )
            png = out / "overlays" / f"{_safe_name(s.id)}.png"
            _save_png(png, fig)
            overlay_files.append(str(png))
            shown += 1
    metrics = {
        "split": split,
        "checkpoint": str(checkpoint),
        "images": len(items),
        **overall.scores(params.class_names),
        "per_dataset": {k: v.scores(params.class_names) for k, v in sorted(per_ds.items())},
        "per_image": per_image,
        "overlay_files": overlay_files,
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def predict_folder(
    params: Params,
    checkpoint: str | Path,
    input_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment every image in ``input_dir`` at full size.

    For each ``NAME.ext`` writes the label files of :func:`save_label_files` and
    ``NAME_overlay.png`` (image | prediction over it, the data bar hatched as 'not sample',
    a scale bar where the pixel size is known). The data bar (``predict.data_bar``: the FEI
    tag, else detected) is not segmented: it is 'not sample' in every mask and outside the
    class fractions. Unreadable files are listed under ``skipped``; nothing in the input
    folder is modified.
    """
    pr = params.predict
    src = Path(input_dir or pr.input_dir)
    out = Path(out_dir or pr.out_dir)
    if not src.is_dir():
        raise MissingError(f"predict.input_dir: folder {src} not found")
    if src.resolve() == out.resolve():
        raise InputError(f"predict.out_dir must differ from predict.input_dir ({src})")
    model, cfg = load_checked(params, checkpoint)
    codec = MaskCodec.from_params(params)
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    stems = Counter(p.stem for p in files if is_image_file(p))
    written, skipped = [], []
    warned = unscaled_warned = False
    for p in tqdm(files, desc="predict", disable=not progress, unit="img"):
        if not is_image_file(p):
            if not (p.suffix in SIDECARS and p.stem in stems):  # a calibration sidecar
                skipped.append({"path": str(p), "reason": "not an image file"})
            continue
        if stems[p.stem] > 1:  # a.png and a.tif would write the same a_pred.png
            skipped.append({"path": str(p), "reason": f"another image is also named {p.stem!r}"})
            continue
        try:
            img = read_grey(p)
            cal = calibrate(p, img, pr.pixel_size_nm, pr.data_bar, "predict.data_bar")
        except ImageReadError as e:
            skipped.append({"path": str(p), "reason": str(e)})
            log.warning("skipped %s", e)
            continue
        bar = cal["data_bar_rows"]
        if bar >= img.shape[0]:
            skipped.append({"path": str(p), "reason": f"data bar of {bar} rows fills the image"})
            continue
        if bar and codec.ignore_color is None and not warned:
            log.warning(
                "data bars found but mask.ignore_color is not set: the bar is black in the "
                "colour masks; set mask.ignore_color so a corrected mask keeps it unlabelled"
            )
            warned = True
        sample = img[: img.shape[0] - bar]
        nm = cal["pixel_size_nm"]
        if cfg.get("resample_nm") and not nm and not unscaled_warned:
            log.warning(
                "the model was trained at %g nm pixels; %s (and maybe others) has no known "
                "pixel size (predict.pixel_size_nm sets one): predicted at its own pixels",
                cfg["resample_nm"],
                p.name,
            )
            unscaled_warned = True
        pred = with_bar(_predict(model, cfg, sample, params, nm), img.shape[0], bar)
        save_label_files(out, p.stem, pred, codec)
        fig = overlay_figure(
            stretch(img),
            None,
            codec.to_color(pred),
            bar_rows=bar,
            pixel_size_nm=cal["pixel_size_nm"],
        )
        _save_png(out / f"{p.stem}_overlay.png", fig)
        fractions = np.bincount(pred.ravel(), minlength=256)[: params.num_classes]
        fractions = fractions / max(int(fractions.sum()), 1)
        written.append(
            {
                "image": str(p),
                "height": int(img.shape[0]),
                "width": int(img.shape[1]),
                "data_bar_rows": bar,
                "data_bar_source": cal["data_bar_source"],
                "pixel_size_nm": cal["pixel_size_nm"],
                "pixel_size_source": cal["pixel_size_source"],
                "class_fractions": {
                    n: round(float(f), 6)
                    for n, f in zip(params.class_names, fractions, strict=True)
                },
            }
        )
    summary = {"checkpoint": str(checkpoint), "predicted": written, "skipped": skipped}
    atomic_write_json(out / "predictions.json", summary)
    return summary
