"""MAE pretraining run: unlabelled tiles in, encoder checkpoint and pictures out, resumable.

Outputs in ``pretrain.out_dir``: ``encoder.pt`` (+ ``.json``) holding the state_dict of
the segmentation model's ``encoder`` module (it loads with ``load_weights``), ``last.pt`` with
everything needed to resume, ``pretrain_metrics.json`` and ``reconstructions.png``
(rows: input, masked input, reconstruction).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srpu_pipelines.analysis.inference import autocast_ctx, use_bf16
from srpu_pipelines.config import Params
from srpu_pipelines.data.index import image_hashes
from srpu_pipelines.data.pool import UnlabeledTiles, load_standardized, unlabeled_paths
from srpu_pipelines.io_utils import atomic_write_bytes, atomic_write_json
from srpu_pipelines.models.checkpoint import model_config, read_checkpoint, save_checkpoint
from srpu_pipelines.models.factory import model_from_params
from srpu_pipelines.training.losses import lr_factor
from srpu_pipelines.training.mae import (
    CnnMae,
    build_mae,
    masked_patch_loss,
    random_patch_mask,
    resolve_method,
)
from srpu_pipelines.training.trainer import seed_everything

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    out_dir: Path
    method: str
    steps: int
    epochs: int
    seconds: float
    images: int
    history: list[dict[str, Any]] = field(default_factory=list)
    trained: bool = True

    @property
    def encoder_checkpoint(self) -> Path:
        return self.out_dir / "encoder.pt"

    @property
    def reconstructions(self) -> Path:
        return self.out_dir / "reconstructions.png"

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "epochs": self.epochs,
            "seconds": round(self.seconds, 1),
            "images": self.images,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "history": self.history,
        }


def _prepare(params: Params, index: dict[str, Any]) -> tuple[str, list[str], str]:
    """(method, image paths, fingerprint of everything the encoder depends on)."""
    pp = params.pretrain
    method = resolve_method(pp.method, params.model.encoder)
    paths = unlabeled_paths(index, pp.use_pool, pp.splits)
    if not paths:
        raise ValueError(
            "pretrain: no images to pretrain on (pretrain.use_pool and pretrain.splits "
            f"{pp.splits} select none in {params.data.index_path})"
        )
    return method, paths, _fingerprint(params, method, paths, image_hashes(index))


def _done(state: dict[str, Any], total_steps: int, budget: float | None) -> bool:
    hit = int(state["step"]) >= total_steps or (
        budget is not None and float(state["elapsed_s"]) >= budget
    )
    return bool(state.get("finished")) and hit


def pretrain_is_finished(
    params: Params,
    index: dict[str, Any],
    out_dir: str | Path | None = None,
    budget_s: float | None = None,
    max_steps: int | None = None,
) -> bool:
    """True when ``pretrain_mae`` with these arguments would train nothing."""
    pp = params.pretrain
    out = Path(out_dir or pp.out_dir)
    last = out / "last.pt"
    if not (pp.resume and last.is_file() and (out / "encoder.pt").is_file()):
        return False
    state, _ = read_checkpoint(last)
    _, _, fp = _prepare(params, index)
    total = max_steps or pp.epochs * pp.steps_per_epoch
    budget = budget_s if budget_s is not None else pp.budget_s
    return state.get("fingerprint") == fp and _done(state, total, budget)


def _fingerprint(params: Params, method: str, paths: list[str], hashes: dict[str, str]) -> str:
    pp = params.pretrain.model_dump(
        mode="json", exclude={"out_dir", "resume", "epochs", "budget_s", "reconstructions"}
    )
    blob = {
        "model": model_config(params),
        "pretrain": pp,
        "method": method,
        "seed": params.seed,
        "images": [hashes.get(p, p) for p in paths],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _to_u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(
    mae: torch.nn.Module, paths: list[str], params: Params, n: int, seed: int
) -> bytes | None:
    """PNG bytes: one row per image (centre crop), columns input | masked | reconstruction.

    With ``norm_pix_loss`` the model predicts each patch normalised; for display the
    prediction is mapped back with the true patch's mean and spread (as in the MAE paper's
    figures), and visible patches show the input.
    """
    from PIL import Image

    from srpu_pipelines.training.mae import patchify, unpatchify

    pp = params.pretrain
    rows = []
    g = torch.Generator().manual_seed(seed)
    mae.eval()
    for path in paths[:n]:
        img = load_standardized(path)
        t = min(pp.tile_size * 2, (min(img.shape) // pp.patch_size) * pp.patch_size)
        if t < pp.patch_size * 2:
            continue
        y0, x0 = (img.shape[0] - t) // 2, (img.shape[1] - t) // 2
        x = torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + t, x0 : x0 + t]))[None, None]
        gh = gw = t // pp.patch_size
        mask = random_patch_mask(1, gh, gw, pp.mask_ratio, g)
        rec = mae(x, mask).float()[:, :1]
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


def pretrain_mae(
    params: Params,
    index: dict[str, Any],
    out_dir: str | Path | None = None,
    budget_s: float | None = None,
    max_steps: int | None = None,
    callbacks: list[Callable[[dict[str, Any]], None]] | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain the encoder of ``params.model`` by masked-image modelling.

    A finished run with the same settings and images trains nothing; one stopped midway
    resumes from its last epoch; other settings or images start over in the folder (the
    encoder it held described other data).
    """
    pp = params.pretrain
    out = Path(out_dir or pp.out_dir)
    total_steps = max_steps or pp.epochs * pp.steps_per_epoch
    budget = budget_s if budget_s is not None else pp.budget_s
    method, paths, fp = _prepare(params, index)
    seed_everything(params.seed)
    # random init: the encoder is learnt from these images only (model.weights is not used)
    model = model_from_params(params.model.model_copy(update={"weights": None}), params.num_classes)
    mae = build_mae(
        model, method, params.model.in_channels, pp.patch_size, pp.decoder_dim, pp.decoder_depth
    )
    opt = torch.optim.AdamW(
        mae.parameters(), lr=pp.lr, weight_decay=pp.weight_decay, betas=(0.9, 0.95)
    )
    bf16 = use_bf16(pp.precision)
    cfg = {**model_config(params), "kind": "encoder", "method": method}

    step, epoch, elapsed0, history = 0, 0, 0.0, []
    last_path = out / "last.pt"
    state = read_checkpoint(last_path)[0] if pp.resume and last_path.is_file() else None
    if state is not None and state.get("fingerprint") != fp:
        log.info("%s: settings or images changed; pretraining starts over", last_path)
        state = None
    if state is not None and set(state["mae"]) != set(mae.state_dict()):
        log.info("%s: the model's layout changed since; pretraining starts over", last_path)
        state = None
    if state is not None:
        mae.load_state_dict(state["mae"])
        opt.load_state_dict(state["optimizer"])
        step, epoch = int(state["step"]), int(state["epoch"])
        elapsed0, history = float(state["elapsed_s"]), list(state["history"])
        if _done(state, total_steps, budget) and (out / "encoder.pt").is_file():
            return PretrainResult(
                out, method, step, epoch, elapsed0, len(paths), history, trained=False
            )

    tiles = UnlabeledTiles(paths, pp.tile_size, pp.steps_per_epoch * pp.batch_size, params.seed)
    loader = torch.utils.data.DataLoader(tiles, batch_size=pp.batch_size, num_workers=0)
    gh = gw = pp.tile_size // pp.patch_size
    t0 = time.monotonic() - elapsed0
    start_step = step

    def elapsed() -> float:
        return time.monotonic() - t0

    def out_of_budget() -> bool:
        return step >= total_steps or (budget is not None and elapsed() >= budget)

    while not out_of_budget():
        tiles.set_epoch(epoch)
        g = torch.Generator().manual_seed(params.seed * 100003 + epoch)
        mae.train()
        losses = []
        bar = tqdm(loader, desc=f"mae epoch {epoch + 1}", disable=not progress, leave=False)
        for x in bar:
            prog = (
                step / total_steps
                if budget is None
                else max(step / total_steps, elapsed() / budget)
            )
            lr = pp.lr * lr_factor(prog, step, pp.warmup_steps, pp.min_lr_ratio)
            for grp in opt.param_groups:
                grp["lr"] = lr
            mask = random_patch_mask(x.shape[0], gh, gw, pp.mask_ratio, g)
            with autocast_ctx(bf16):
                rec = mae(x, mask)
            target = x.expand(-1, rec.shape[1], -1, -1)
            loss = masked_patch_loss(rec, target, mask, pp.patch_size, pp.norm_pix_loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"MAE loss became {loss.item()} at step {step}; lower pretrain.lr ({pp.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if out_of_budget():
                break
        epoch += 1
        if isinstance(mae, CnnMae):
            mae.recalibrate_bn([x for _, x in zip(range(8), loader, strict=False)])
        rec_ = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(losses)) if losses else math.nan,
            "lr": lr,
            "elapsed_s": round(elapsed(), 1),
        }
        history.append(rec_)
        finished = out_of_budget()
        # the encoder first: a run killed in between resumes and rewrites both
        save_checkpoint(out / "encoder.pt", model.encoder, {**cfg, "epoch": epoch, "step": step})
        save_checkpoint(
            last_path,
            model.encoder,
            cfg,
            {
                "mae": mae.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "epoch": epoch,
                "elapsed_s": elapsed(),
                "history": history,
                "fingerprint": fp,
                "finished": finished,
            },
        )
        if progress:
            tqdm.write(f"mae epoch {epoch}: step {step}, loss {rec_['loss']:.4f}, {elapsed():.0f}s")
        for cb in callbacks or []:
            cb(rec_)
    result = PretrainResult(
        out, method, step, epoch, elapsed(), len(paths), history, trained=step > start_step
    )
    png = reconstruction_grid(mae, paths, params, pp.reconstructions, params.seed)
    if png is not None:
        atomic_write_bytes(result.reconstructions, png)
    atomic_write_json(out / "pretrain_metrics.json", result.summary())
    return result
