"""Scoring the pool: uncertainty per image and tile, and embeddings, stored per image.

Scoring is the expensive half of active learning, so its results are kept: one JSON record
(scores) and one ``.npy`` (embeddings, one row per tile) per pool image under
``active.out_dir/scores``. A record names the model that made it (``model_key``: registry
version and checkpoint hash), the image's content hash and the scoring settings; a record
that differs in any of them is stale and is recomputed, the others are kept. Images are
streamed one at a time, so memory does not grow with the pool, and an interrupted scoring
run resumes where it stopped.

Without a model (cold start) the record holds no uncertainty, and as embeddings either the
MAE encoder's features (``active.cold_features``: mae, or auto where ``srpu pretrain``
has written one) or appearance features: intensity and texture histograms that need no
training.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from srpu_pipelines.active_learning.uncertainty import (
    score_probabilities,
    tile_grid,
)
from srpu_pipelines.analysis.evaluate import inference_runtime
from srpu_pipelines.analysis.inference import (
    input_scale,
    iter_prob_bands,
    resize_probs,
    scaled_input,
)
from srpu_pipelines.compute.device import Runtime
from srpu_pipelines.config import Params
from srpu_pipelines.data.dataset import read_sample, resize_image, standardize
from srpu_pipelines.data.imageio import ImageReadError
from srpu_pipelines.errors import MissingError
from srpu_pipelines.io.faults import fault_point
from srpu_pipelines.io.files import (
    atomic_write_json,
    atomic_write_with,
    read_json,
    sha256_file_cached,
)

log = logging.getLogger(__name__)
COLD_KEY = "cold-start"  # model_key of records made without a model
SCORES_VERSION = 3  # 2: the data bar is cut off before scoring; 3: class_probs per tile


def safe_name(item_id: str) -> str:
    """A file name for an item id (``dataset/name``, maybe with spaces or unicode)."""
    return item_id.replace("/", "__")


# -- ensembles ---------------------------------------------------------------------------
class _Dihedral(nn.Module):
    """The model seen through a flip and a quarter turn (undone on the output)."""

    def __init__(self, model: nn.Module, turns: int, flip: bool):
        super().__init__()
        self.model, self.turns, self.flip = model, turns, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.rot90(x, self.turns, (2, 3))
        y = y.flip(3) if self.flip else y
        out = self.model(y)
        out = out.flip(3) if self.flip else out
        return torch.rot90(out, -self.turns, (2, 3))


_DIHEDRAL = [(0, False), (0, True), (1, False), (2, False), (3, False), (1, True), (2, True)]


def _mc_dropout_hook(p: float):
    def hook(_module: nn.Module, _inp: Any, out: Any) -> Any:
        if isinstance(out, list | tuple):
            return type(out)(F.dropout2d(f, p, training=True) if f.ndim == 4 else f for f in out)
        return F.dropout2d(out, p, training=True)

    return hook


def ensemble_probs(
    model: nn.Module, image: np.ndarray, params: Params, in_channels: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean probabilities (C, H, W) float16 over the ensemble members and their variance
    (H, W) float32 (None for a single member). The members slide over the image in step,
    one row band at a time on the model's device, so memory is a few bands plus the two
    outputs whatever the ensemble and image size.

    ``scale`` != 1 (a model trained on resampled pixels): the members see the image
    resampled by ``scale`` and both outputs are resampled back to the image's pixels."""
    if scale != 1.0:
        mean_s, var_s = ensemble_probs(model, scaled_input(image, scale), params, in_channels)
        mean_b = resize_probs(mean_s, image.shape).astype(np.float16)
        var_b = None if var_s is None else np.clip(resize_image(var_s, image.shape), 0, None)
        return mean_b, var_b
    ens, inf = params.active.ensemble, params.inference
    rt = inference_runtime(params.inference)
    kw = dict(
        tile=inf.tile_size,
        overlap=inf.overlap,
        batch_size=inf.batch_size,
        precision=rt.precision,
        in_channels=in_channels,
        channels_last=rt.channels_last,
    )
    m = 1 if ens.method == "none" else ens.members
    nets: list[nn.Module] = [model] * m
    if ens.method == "tta":
        nets = [_Dihedral(model, *_DIHEDRAL[i % len(_DIHEDRAL)]) for i in range(m)]
    handle = None
    if ens.method == "mc_dropout":
        handle = model.encoder.register_forward_hook(_mc_dropout_hook(ens.dropout))
        torch.manual_seed(1000)  # the same members every run: scores reproduce
    mean: np.ndarray | None = None
    var = np.zeros(image.shape, np.float32) if m > 1 else None
    try:
        streams = [iter_prob_bands(net, image, **kw) for net in nets]
        for bands in zip(*streams, strict=True):
            y0 = bands[0][0]
            stack = torch.stack([p for _, p in bands])  # (M, C, rows, W) on the device
            if mean is None:
                mean = np.empty((stack.shape[1], *image.shape), np.float16)
            rows = slice(y0, y0 + stack.shape[2])
            mean[:, rows] = stack.mean(0).to(torch.float16).cpu().numpy()
            if var is not None:
                var[rows] = stack.var(0, unbiased=False).mean(0).cpu().numpy()
    finally:
        if handle is not None:
            handle.remove()
    assert mean is not None
    return mean, var


# -- embeddings and appearance features ----------------------------------------------------
@torch.no_grad()
def tile_embeddings(
    model: nn.Module,
    image: np.ndarray,
    tiles: list[tuple[int, int, int, int]],
    in_channels: int,
    rt: Runtime,
) -> np.ndarray:
    """(n_tiles, D) float32: the encoder's deepest feature map averaged over each tile of
    the standardised image (tiles reflect-padded to a multiple of 32)."""
    model.eval()
    rows = []
    for y, x, h, w in tiles:
        crop = image[y : y + h, x : x + w]
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            crop = np.pad(crop, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
        t = torch.from_numpy(np.ascontiguousarray(crop, np.float32))[None, None].to(rt.device)
        with rt.precision.autocast():
            feats = model.encoder(t.expand(-1, in_channels, -1, -1))
        deepest = feats[-1] if isinstance(feats, list | tuple) else feats
        rows.append(deepest.float().mean((2, 3))[0].cpu().numpy())
    return np.stack(rows).astype(np.float32)


def appearance_features(image01: np.ndarray) -> np.ndarray:
    """A model-free description of a (stretched) grey micrograph, float32 (40,): histograms
    of standardised intensity and of gradient magnitude at full and quarter resolution.
    Similar microstructures give similar vectors; what cold-start selection clusters."""
    out = []
    img = standardize(image01)
    for scale in (1, 4):
        im = img[::scale, ::scale] if scale > 1 else img
        out.append(np.histogram(np.clip(im, -3, 3), bins=10, range=(-3, 3))[0] / im.size)
        gy, gx = np.gradient(im)
        g = np.hypot(gx, gy)
        out.append(np.histogram(np.clip(g, 0, 3), bins=10, range=(0, 3))[0] / g.size)
    return np.concatenate(out).astype(np.float32)


def cold_embedder(params: Params) -> tuple[nn.Module | None, str]:
    """(model whose encoder embeds tiles in a cold start, its tag): the MAE encoder of
    ``pretrain.out_dir`` (``active.cold_features``: mae, or auto where it exists), else
    (None, "appearance"). The tag (the encoder file's hash) makes records made with
    another encoder stale."""
    from srpu_pipelines.models.checkpoint import build_from_config, read_checkpoint
    from srpu_pipelines.models.factory import load_weights

    tag = cold_tag(params)
    if tag == "appearance":
        return None, tag
    enc = Path(params.pretrain.out_dir) / "encoder.pt"
    _, config = read_checkpoint(enc)
    model = build_from_config(config)
    load_weights(model, enc, require="encoder")
    rt = inference_runtime(params.inference)
    return model.to(rt.device).eval(), tag


def cold_tag(params: Params) -> str:
    """What embeds tiles in a cold start: "appearance", or "mae:<encoder hash>"."""
    how = params.active.cold_features
    enc = Path(params.pretrain.out_dir) / "encoder.pt"
    if how == "appearance" or (how == "auto" and not enc.is_file()):
        return "appearance"
    if not enc.is_file():
        raise MissingError(
            f"active.cold_features: mae, but {enc} does not exist: run `srpu pretrain` "
            "(or materialize mae_encoder) first, or set active.cold_features: auto"
        )
    return f"mae:{sha256_file_cached(enc)[:12]}"


# -- the store ------------------------------------------------------------------------------
def settings_key(params: Params, cold_tag: str = "") -> str:
    """What makes stored scores comparable besides the model and the image (in a cold
    start also what embeds the tiles, ``cold_tag``)."""
    a = params.active
    keys = {
        "cold": cold_tag,
        "v": SCORES_VERSION,
        "strategies": sorted(a.strategies),
        "tile_size": a.tile_size,
        "topk_fraction": a.topk_fraction,
        "boundary_width": a.boundary_width,
        "ensemble": a.ensemble.model_dump(),
        "inference": params.inference.model_dump(),
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def scores_dir(params: Params) -> Path:
    return Path(params.active.out_dir) / "scores"


def record_paths(params: Params, item_id: str) -> tuple[Path, Path]:
    # not with_suffix: "S1_0.5kV" would become "S1_0.json", shared with "S1_0.7kV"
    base = scores_dir(params) / safe_name(item_id)
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".npy")


def is_fresh(
    record: dict[str, Any] | None, item: dict[str, Any], model_key: str, settings: str
) -> bool:
    return (
        record is not None
        and record.get("model_key") == model_key
        and record.get("image_sha256") == item["image_sha256"]
        and record.get("settings") == settings
        and record.get("data_bar_rows", 0) == int(item.get("data_bar_rows") or 0)
        # a model trained on resampled pixels scores an image at its pixel size
        and record.get("pixel_size_nm") == item.get("pixel_size_nm")
    )


def load_record(params: Params, item_id: str) -> dict[str, Any] | None:
    """The stored record of one pool image, or None when there is none or it is unreadable
    (then it is recomputed)."""
    js, npy = record_paths(params, item_id)
    if not (js.is_file() and npy.is_file()):
        return None
    try:
        return read_json(js)
    except ValueError as e:
        log.warning("%s; it will be recomputed", e)
        return None


def load_embeddings(params: Params, item_id: str) -> np.ndarray:
    """(n_tiles, D) embeddings (or appearance features) of a scored image."""
    return np.load(record_paths(params, item_id)[1])


def score_image(
    params: Params,
    item: dict[str, Any],
    model: nn.Module | None,
    in_channels: int,
    model_key: str,
    embedder: nn.Module | None = None,
    settings: str | None = None,
    model_config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Score one pool image: (record, embeddings (n_tiles, D)). Only the sample above its
    data bar is scored and tiled: the bar can never be picked. Without a model (cold
    start) the embeddings come from ``embedder``'s encoder, or appearance features."""
    a = params.active
    bar = int(item.get("data_bar_rows") or 0)
    image01 = read_sample(item["image"], bar)
    h, w = image01.shape
    tiles = tile_grid(h, w, a.tile_size)
    record: dict[str, Any] = {
        "id": item["id"],
        "dataset": item["dataset"],
        "image": item["image"],
        "image_sha256": item["image_sha256"],
        "height": h + bar,
        "width": w,
        "data_bar_rows": bar,
        "pixel_size_nm": item.get("pixel_size_nm"),
        "model_key": model_key,
        "settings": settings or settings_key(params),
    }
    if model is None:
        if embedder is not None:
            feats = tile_embeddings(
                embedder,
                standardize(image01),
                tiles,
                in_channels,
                inference_runtime(params.inference),
            )
        else:
            feats = np.stack(
                [appearance_features(image01[y : y + th, x : x + tw]) for y, x, th, tw in tiles]
            )
        record["image_scores"] = {}
        record["tiles"] = [
            {"y": y, "x": x, "h": th, "w": tw, "scores": {}} for y, x, th, tw in tiles
        ]
        return record, feats
    img = standardize(image01)
    scale = input_scale(model_config or {}, item.get("pixel_size_nm"))
    probs, var = ensemble_probs(model, img, params, in_channels, scale)
    sc = score_probabilities(
        probs, var, a.strategies, a.boundary_width, a.topk_fraction, tiles=tiles
    )
    fractions = np.bincount(probs.argmax(0).ravel(), minlength=probs.shape[0]) / probs[0].size
    record["image_scores"] = sc["image"]
    record["class_probs"] = sc["class_probs"]
    record["tiles"] = sc["tiles"]
    record["predicted_fractions"] = [round(float(f), 6) for f in fractions]
    emb = tile_embeddings(model, img, tiles, in_channels, inference_runtime(params.inference))
    return record, emb


def score_pool(
    params: Params,
    index: dict[str, Any],
    checkpoint: str | Path | None,
    model_key: str,
    progress: bool = True,
    datasets: set[str] | None = None,
) -> dict[str, Any]:
    """Score every pool image whose stored record is stale (another model, image content or
    settings) or missing; keep the rest. ``checkpoint`` None scores for a cold start.
    Where selection measures distances to what is labelled (``active.scores_labeled``:
    core-set, TypiClust, ProbCover, rare, auto), labelled images are scored too, for their
    embeddings (nothing else reads them).

    Writes ``scores/summary.json`` (per image: its scores per strategy and aggregation, the
    model key; the same bytes when nothing changed) and returns it with the counts
    ``computed``, ``kept`` and the ``failed`` images."""
    from srpu_pipelines.analysis.evaluate import load_checked

    model, in_ch, embedder, cold_tag = None, params.model.in_channels, None, ""
    cfg: dict[str, Any] = {}
    if checkpoint is not None:
        model, cfg = load_checked(params, checkpoint)  # on the inference device
        in_ch = cfg["in_channels"]
    else:
        embedder, cold_tag = cold_embedder(params)
        log.info("cold start: tiles embedded by %s", cold_tag)
    settings = settings_key(params, cold_tag)
    pool_ids = {it["id"] for it in index.get("pool", [])}
    todo = list(index.get("pool", []))
    if params.active.scores_labeled:
        todo += index["items"]
    if datasets is not None:  # one part of the fan-out: these sub-datasets only
        todo = [it for it in todo if it["dataset"] in datasets]
        pool_ids = {it["id"] for it in index.get("pool", []) if it["dataset"] in datasets}
    computed, kept, failed = 0, 0, []
    rows = []
    for item in tqdm(todo, desc="score pool", disable=not progress, unit="img"):
        rec = load_record(params, item["id"])
        if is_fresh(rec, item, model_key, settings):
            kept += 1
        else:
            try:
                rec, emb = score_image(
                    params, item, model, in_ch, model_key, embedder, settings, cfg
                )
            except ImageReadError as e:
                log.warning("not scored: %s", e)
                failed.append({"id": item["id"], "reason": str(e)})
                continue
            js, npy = record_paths(params, item["id"])
            atomic_write_with(npy, lambda tmp, emb=emb: np.save(tmp, emb))
            atomic_write_json(js, rec)  # the record last: it vouches for the .npy
            computed += 1
            fault_point("score:image")
        if item["id"] not in pool_ids:
            continue
        rows.append(
            {
                "id": rec["id"],
                "dataset": rec["dataset"],
                "tiles": len(rec["tiles"]),
                "scores": rec["image_scores"],
            }
        )
    summary = {
        "model_key": model_key,
        "settings": settings,
        "aggregation": params.active.aggregation,
        "images": rows,
        "failed": failed,
    }
    name = "summary.json" if datasets is None else f"summary-{'+'.join(sorted(datasets))}.json"
    atomic_write_json(scores_dir(params) / name, summary)
    return {**summary, "computed": computed, "kept": kept}
