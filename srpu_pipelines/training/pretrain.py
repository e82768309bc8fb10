"""MAE pretraining run: unlabelled tiles in, encoder checkpoint and pictures out, resumable.

A :class:`~srpu_pipelines.training.loop.Task` of the one loop. Outputs in
``pretrain.out_dir``: ``encoder.pt`` (+ ``.json``) holding the state_dict of the
segmentation model's ``encoder`` module (it loads with ``load_weights``), ``last.pt`` with
everything needed to resume, ``pretrain_metrics.json`` and ``reconstructions.png``
(rows: input, masked input, reconstruction).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srpu_pipelines.compute.device import module_device
from srpu_pipelines.config import PretrainParams, PretrainSetup
from srpu_pipelines.data.index import image_hashes
from srpu_pipelines.data.pool import UnlabeledTiles, bar_rows, load_standardized, unlabeled_paths
from srpu_pipelines.errors import InputError
from srpu_pipelines.io.files import atomic_write_bytes, atomic_write_json
from srpu_pipelines.models.checkpoint import model_config, save_checkpoint
from srpu_pipelines.models.factory import model_from_params
from srpu_pipelines.training.loop import (
    EXECUTION_KEYS,
    EpochCallback,
    Loop,
    RunResult,
    Task,
    run_task,
    task_is_finished,
)
from srpu_pipelines.training.mae import (
    CnnMae,
    build_mae,
    masked_patch_loss,
    n_masked,
    patchify,
    random_patch_mask,
    resolve_method,
    unpatchify,
)
from srpu_pipelines.training.plan import plan_model

log = logging.getLogger(__name__)


class MaskedTiles(torch.utils.data.Dataset):
    """(tile, patch mask) items: the mask of item ``k`` comes from the tile's own
    generator, so it is the same whatever the workers or processes."""

    def __init__(self, tiles: UnlabeledTiles, patch: int, ratio: float) -> None:
        self.tiles, self.g = tiles, tiles.tile // patch
        self.k = n_masked(ratio, self.g, self.g)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.tiles.generator(index, salt=11)
        mask = np.zeros(self.g * self.g, bool)
        mask[rng.permutation(self.g * self.g)[: self.k]] = True
        return self.tiles[index], torch.from_numpy(mask.reshape(self.g, self.g))


def _to_u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(
    mae: torch.nn.Module,
    paths: list[str],
    pp: PretrainParams,
    n: int,
    seed: int,
    bars: dict[str, int] | None = None,
) -> bytes | None:
    """PNG bytes: one row per image (centre crop), columns input | masked | reconstruction.

    With ``norm_pix_loss`` the model predicts each patch normalised; for display the
    prediction is mapped back with the true patch's mean and spread (as in the MAE paper's
    figures), and visible patches show the input.
    """
    from PIL import Image

    rows = []
    device = module_device(mae)
    g = torch.Generator().manual_seed(seed)
    mae.eval()
    for path in paths[:n]:
        img = load_standardized(path, (bars or {}).get(path, 0))
        t = min(pp.tile_size * 2, (min(img.shape) // pp.patch_size) * pp.patch_size)
        if t < pp.patch_size * 2:
            continue
        y0, x0 = (img.shape[0] - t) // 2, (img.shape[1] - t) // 2
        x = torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + t, x0 : x0 + t]))[None, None]
        gh = gw = t // pp.patch_size
        mask = random_patch_mask(1, gh, gw, pp.mask_ratio, g)
        rec = mae(x.to(device), mask.to(device)).float().cpu()[:, :1]
        if pp.norm_pix_loss:
            tp, rp = patchify(x, pp.patch_size), patchify(rec, pp.patch_size)
            mu, sd = tp.mean(-1, keepdim=True), (tp.var(-1, keepdim=True) + 1e-6).sqrt()
            rec = unpatchify(rp * sd + mu, pp.patch_size, 1, gh, gw)
        m = mask.repeat_interleave(pp.patch_size, 1).repeat_interleave(pp.patch_size, 2)[0]
        xi, ri = x[0, 0].numpy(), rec[0, 0].numpy()
        lo, hi = np.percentile(xi, [1, 99])
        masked = np.where(m.numpy(), np.nan, xi)
        shown = np.where(m.numpy(), ri, xi)
        a, c = _to_u8(xi, lo, hi), _to_u8(shown, lo, hi)
        b = _to_u8(np.nan_to_num(masked, nan=lo), lo, hi)
        b[m.numpy()] = 40  # masked patches dark grey
        sep = np.full((t, 4), 255, np.uint8)
        rows.append(np.concatenate([a, sep, b, sep, c], 1))
    if not rows:
        return None
    w = max(r.shape[1] for r in rows)
    grid = np.concatenate(
        [np.pad(r, ((0, 4), (0, w - r.shape[1])), constant_values=255) for r in rows], 0
    )
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


class MaeTask(Task):
    """Pretrain the encoder of ``setup.model`` by masked-image modelling on the pool and
    the pixels of ``pretrain.splits``. Other settings or images start over in the folder
    (the encoder it held described other data)."""

    kind = "pretrain"
    restart_on_change = True
    betas = (0.9, 0.95)
    # the cnn path re-masks after every BatchNorm through forward hooks, which a
    # conversion to SyncBatchNorm would drop; its statistics are re-estimated each epoch
    sync_batchnorm = False

    def __init__(self, setup: PretrainSetup, index: dict[str, Any]) -> None:
        pp = setup.pretrain
        super().__init__(pp, setup.seed)
        if setup.model.is_auto:  # the model the stages will plan: the same choice, kept
            mp, _ = plan_model(setup.model, setup.model_train, setup.class_names, index)
            setup = setup.model_copy(update={"model": mp})
        self.setup, self.pp, self.out = setup, pp, Path(pp.out_dir)
        self.method = resolve_method(pp.method, setup.model.encoder)
        self.paths = unlabeled_paths(index, pp.use_pool, pp.splits)
        self.bars = bar_rows(index)
        if not self.paths:
            raise InputError(
                "pretrain: no images to pretrain on (pretrain.use_pool and pretrain.splits "
                f"{pp.splits} select none in the index)"
            )
        self.hashes = image_hashes(index)
        self.find_unused_parameters = self.method == "vit"

    def fingerprint(self) -> str:
        pp = self.pp.model_dump(mode="json", exclude=EXECUTION_KEYS | {"reconstructions"})
        blob = {
            "model": model_config(self.setup),
            "pretrain": pp,
            "method": self.method,
            "seed": self.seed,
            "images": [self.hashes.get(p, p) for p in self.paths],
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def config(self) -> dict[str, Any]:
        return {**model_config(self.setup), "kind": "encoder", "method": self.method}

    def outputs_exist(self) -> bool:
        return (self.out / "encoder.pt").is_file()

    def build(self) -> nn.Module:
        # random init: the encoder is learnt from these images only (model.weights unused)
        mp = self.setup.model.model_copy(update={"weights": None})
        self.seg = model_from_params(mp, self.setup.num_classes)
        pp = self.pp
        return build_mae(
            self.seg, self.method, mp.in_channels, pp.patch_size, pp.decoder_dim, pp.decoder_depth
        )

    def on_train_start(self, loop: Loop) -> None:
        pp = self.pp
        tiles = UnlabeledTiles(
            self.paths,
            pp.tile_size,
            pp.steps_per_epoch * pp.batch_size,
            self.seed,
            bars=self.bars,
        )
        self.loader = loop.loader(MaskedTiles(tiles, pp.patch_size, pp.mask_ratio), pp.batch_size)

    def batches(self, loop: Loop, epoch: int):
        self.loader.sampler.set_epoch(epoch)
        return self.loader

    def train_step(self, loop: Loop, module: nn.Module, batch: Any):
        x, mask = loop.to_device(batch[0]), batch[1].to(loop.rt.device)
        rec = module(x, mask)
        target = x.expand(-1, rec.shape[1], -1, -1)
        return masked_patch_loss(rec, target, mask, self.pp.patch_size, self.pp.norm_pix_loss), {}

    def on_epoch_end(self, loop: Loop, rec: dict[str, Any]) -> None:
        if isinstance(loop.model, CnnMae):
            batches = [loop.to_device(x) for (x, _), _ in zip(self.loader, range(8), strict=False)]
            loop.model.recalibrate_bn(batches)
        return None

    def save_outputs(self, loop: Loop, rec: dict[str, Any]) -> None:
        # the encoder first: a run killed in between resumes and rewrites both
        meta = {"epoch": loop.epoch, "step": loop.step}
        save_checkpoint(self.out / "encoder.pt", self.seg.encoder, {**self.config(), **meta})

    def summarize(self, result: RunResult) -> None:
        result.info.update(method=self.method, images=len(self.paths))
        result.best_score = float("nan")

    def on_train_end(self, loop: Loop, result: RunResult) -> None:
        pp = self.pp
        png = reconstruction_grid(
            loop.model, self.paths, pp, pp.reconstructions, self.seed, self.bars
        )
        if png is not None:
            atomic_write_bytes(result.reconstructions, png)
        atomic_write_json(self.out / "pretrain_metrics.json", pretrain_summary(result))


def pretrain_summary(result: RunResult) -> dict[str, Any]:
    return {
        "method": result.method,
        "steps": result.steps,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 1),
        "images": result.images,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "history": result.history,
    }


def pretrain_mae(
    setup: PretrainSetup,
    index: dict[str, Any],
    callbacks: list[EpochCallback] | None = None,
    progress: bool = True,
) -> RunResult:
    """MAE pretraining within ``pretrain.max_steps`` (or epochs x steps_per_epoch) and
    ``pretrain.budget_s``; a finished run with the same settings and images trains nothing."""
    return run_task(MaeTask(setup, index), callbacks, progress)


def pretrain_is_finished(setup: PretrainSetup, index: dict[str, Any]) -> bool:
    """True when ``pretrain_mae`` with these arguments would train nothing."""
    return task_is_finished(MaeTask(setup, index))
