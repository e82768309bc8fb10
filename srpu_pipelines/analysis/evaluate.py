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

from srpu_pipelines.analysis.inference import predict_labels
from srpu_pipelines.analysis.metrics import ConfusionAccumulator
from srpu_pipelines.compute.device import Runtime, prepare_module, resolve_runtime
from srpu_pipelines.config import InferenceParams, Params
from srpu_pipelines.data.dataset import load_samples, standardize
from srpu_pipelines.data.imageio import ImageReadError, is_image_file, read_grey
from srpu_pipelines.data.index import select_items
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.io.files import atomic_write_json, atomic_write_with
from srpu_pipelines.models.checkpoint import load_model

log = logging.getLogger(__name__)


def load_checked(params: Params, checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint, check that it was trained for ``params.classes``, and put it on
    the device of ``params.inference`` (eval mode)."""
    model, cfg = load_model(checkpoint)
    if cfg["class_names"] != params.class_names:
        raise ValueError(
            f"{checkpoint}: trained for classes {cfg['class_names']}, params.classes are "
            f"{params.class_names}"
        )
    rt = inference_runtime(params.inference)
    prepare_module(model, rt.device, rt.channels_last)
    return model, cfg


def inference_runtime(inf: InferenceParams) -> Runtime:
    return resolve_runtime(inf.device, inf.precision, inf.channels_last, "inference")


def _predict(model, cfg: dict, image01: np.ndarray, params: Params) -> np.ndarray:
    inf = params.inference
    rt = inference_runtime(inf)
    return predict_labels(
        model,
        standardize(image01),
        tile=inf.tile_size,
        overlap=inf.overlap,
        batch_size=inf.batch_size,
        precision=rt.precision,
        in_channels=cfg["in_channels"],
        channels_last=rt.channels_last,
        flips=inf.tta == "flips",
    )


def overlay_figure(
    image01: np.ndarray, truth_rgb: np.ndarray, pred_rgb: np.ndarray, alpha: float = 0.45
) -> np.ndarray:
    """uint8 (H, 3W + 2*gap, 3): image | truth over image | prediction over image."""
    grey = np.repeat((np.clip(image01, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)

    def blend(rgb: np.ndarray) -> np.ndarray:
        return (grey * (1 - alpha) + rgb * alpha).astype(np.uint8)

    gap = np.full((grey.shape[0], 6, 3), 255, np.uint8)
    return np.concatenate([grey, gap, blend(truth_rgb), gap, blend(pred_rgb)], axis=1)


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
        raise ValueError(f"evaluate.split {split!r}: no labelled images in this split")
    model, cfg = load_checked(params, checkpoint)
    codec = MaskCodec.from_params(params)
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
        pred = _predict(model, cfg, s.image, params)
        overall.update(pred, s.mask)
        per_ds.setdefault(s.dataset, ConfusionAccumulator(params.num_classes)).update(pred, s.mask)
        one = ConfusionAccumulator(params.num_classes)
        one.update(pred, s.mask)
        sc = one.scores(params.class_names)
        per_image.append({"id": s.id, "miou": sc["miou"], "iou": sc["iou"]})
        if shown < params.evaluate.overlays:
            fig = overlay_figure(s.image, codec.to_color(s.mask), codec.to_color(pred))
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

    For each ``NAME.ext`` writes ``NAME_pred.png`` (colour mask in the params colours, ready
    to correct in a painter) and ``NAME_pred_index.png`` (class indices). Unreadable files
    are listed under ``skipped``; nothing in the input folder is modified.
    """
    src = Path(input_dir or params.predict.input_dir)
    out = Path(out_dir or params.predict.out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"predict.input_dir: folder {src} not found")
    if src.resolve() == out.resolve():
        raise ValueError(f"predict.out_dir must differ from predict.input_dir ({src})")
    model, cfg = load_checked(params, checkpoint)
    codec = MaskCodec.from_params(params)
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    stems = Counter(p.stem for p in files if is_image_file(p))
    written, skipped = [], []
    for p in tqdm(files, desc="predict", disable=not progress, unit="img"):
        if not is_image_file(p):
            skipped.append({"path": str(p), "reason": "not an image file"})
            continue
        if stems[p.stem] > 1:  # a.png and a.tif would write the same a_pred.png
            skipped.append({"path": str(p), "reason": f"another image is also named {p.stem!r}"})
            continue
        try:
            img = read_grey(p)
        except ImageReadError as e:
            skipped.append({"path": str(p), "reason": str(e)})
            log.warning("skipped %s", e)
            continue
        pred = _predict(model, cfg, img, params)
        _save_png(out / f"{p.stem}_pred.png", codec.to_color(pred))
        _save_png(out / f"{p.stem}_pred_index.png", pred)
        fractions = np.bincount(pred.ravel(), minlength=params.num_classes) / pred.size
        written.append(
            {
                "image": str(p),
                "height": int(img.shape[0]),
                "width": int(img.shape[1]),
                "class_fractions": {
                    n: round(float(f), 6)
                    for n, f in zip(params.class_names, fractions, strict=True)
                },
            }
        )
    summary = {"checkpoint": str(checkpoint), "predicted": written, "skipped": skipped}
    atomic_write_json(out / "predictions.json", summary)
    return summary
