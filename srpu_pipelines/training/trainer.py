"""One supervised training stage: tiles in, best and last checkpoints out, resumable.

Each epoch is ``train.steps_per_epoch`` optimiser steps on random crops, then a validation
pass over full-size validation images (sliding windows). ``best.pt`` keeps the weights with
the highest validation mIoU; ``last.pt`` keeps everything needed to resume (weights,
optimiser, step, best score, history). A run stopped at any point resumes from the last
finished epoch with no loss of its best score.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srpu_pipelines.analysis.inference import autocast_ctx, predict_labels, use_bf16
from srpu_pipelines.analysis.metrics import ConfusionAccumulator
from srpu_pipelines.config import Params
from srpu_pipelines.data.dataset import Sample, TileSampler, load_samples
from srpu_pipelines.data.index import image_hashes, select_items
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.data.pool import UnlabeledTiles, unlabeled_paths
from srpu_pipelines.io_utils import atomic_write_json, read_json, sha256_file
from srpu_pipelines.models.checkpoint import model_config, read_checkpoint, save_checkpoint
from srpu_pipelines.models.factory import load_weights, model_from_params
from srpu_pipelines.training.losses import SegLoss, lr_factor
from srpu_pipelines.training.semi import fixmatch_loss, ramp, strong_augment

log = logging.getLogger(__name__)
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    out_dir: Path
    best_miou: float
    best_epoch: int
    epochs: int
    steps: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False
    trained: bool = True

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "last.pt"

    def summary(self) -> dict[str, Any]:
        return {
            "best_val_miou": self.best_miou if math.isfinite(self.best_miou) else None,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "steps": self.steps,
            "train_seconds": round(self.train_seconds, 1),
            "history": self.history,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validate(
    model: torch.nn.Module, samples: list[Sample], params: Params, bf16: bool
) -> dict[str, Any]:
    """Scores over full-size images: per-class IoU/Dice and means."""
    inf = params.inference
    acc = ConfusionAccumulator(params.num_classes)
    for s in samples:
        pred = predict_labels(
            model,
            s.normalized,
            tile=inf.tile_size,
            overlap=inf.overlap,
            batch_size=inf.batch_size,
            bf16=bf16,
            in_channels=params.model.in_channels,
        )
        acc.update(pred, s.mask)
    return acc.scores(params.class_names)


def _fingerprint(
    params: Params, train_items: list, val_items: list, init: str | None, index: dict[str, Any]
) -> str:
    """What a run's result depends on: settings, data (by content) and the start weights
    (by content, so a retrained earlier stage re-runs the stages after it)."""
    tp = params.train
    t = tp.model_dump(mode="json", exclude={"out_dir", "resume", "epochs", "budget_s", "threads"})
    unl = _semi_paths(params, index) if tp.semi.enabled else []
    hashes = image_hashes(index)
    blob = {
        "model": model_config(params),
        "train": t,
        "seed": params.seed,
        "init": sha256_file(init) if init and Path(init).is_file() else init,
        "train_data": [(it["id"], it["image_sha256"], it["mask_sha256"]) for it in train_items],
        "val_data": [(it["id"], it["image_sha256"], it["mask_sha256"]) for it in val_items],
        "unlabeled": [hashes.get(p, p) for p in unl],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _semi_paths(params: Params, index: dict[str, Any]) -> list[str]:
    sp = params.train.semi
    return unlabeled_paths(index, True, sp.include_labeled_splits, params.train.datasets)


def _init_path(params: Params, init_weights: str | Path | None) -> str | None:
    if init_weights:
        return str(init_weights)
    return str(params.model.weights) if params.model.weights else None


def _param_groups(model: torch.nn.Module, mode: str, mult: float) -> list[dict[str, Any]]:
    """Optimiser groups for ``train.encoder``: full, frozen (encoder left out and fixed) or
    differential (encoder at lr x mult). Each group carries its ``lr_mult``."""
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    if mode == "full":
        return [{"params": enc + rest, "lr_mult": 1.0}]
    if mode == "frozen":
        for p in enc:
            p.requires_grad_(False)
        return [{"params": rest, "lr_mult": 1.0}]
    return [{"params": enc, "lr_mult": mult}, {"params": rest, "lr_mult": 1.0}]


def _train_mode(model: torch.nn.Module, encoder_mode: str) -> None:
    model.train()
    if encoder_mode == "frozen":
        model.encoder.eval()  # keep the start weights' BatchNorm statistics too


def _run_done(state: dict[str, Any], total_steps: int, budget: float | None) -> bool:
    """A saved run that ended on its step or time budget: resuming it trains nothing."""
    hit = int(state["step"]) >= total_steps or (
        budget is not None and float(state["elapsed_s"]) >= budget
    )
    return bool(state.get("finished")) and hit


def is_finished(
    params: Params,
    index: dict[str, Any],
    out_dir: str | Path | None = None,
    init_weights: str | Path | None = None,
    max_steps: int | None = None,
    budget_s: float | None = None,
) -> bool:
    """True when ``train_stage`` with these arguments would find its run done and train
    nothing (a finished ``last.pt`` with the same settings and data)."""
    tp = params.train
    last = Path(out_dir or tp.out_dir) / "last.pt"
    if not (tp.resume and last.is_file()):
        return False
    state, _ = read_checkpoint(last)
    fp = _fingerprint(
        params,
        select_items(index, tp.splits, tp.datasets),
        select_items(index, [tp.val_split], tp.datasets),
        _init_path(params, init_weights),
        index,
    )
    total = max_steps or tp.epochs * tp.steps_per_epoch
    budget = budget_s if budget_s is not None else tp.budget_s
    return state.get("fingerprint") == fp and _run_done(state, total, budget)


def train_stage(
    params: Params,
    index: dict[str, Any],
    out_dir: str | Path | None = None,
    init_weights: str | Path | None = None,
    budget_s: float | None = None,
    max_steps: int | None = None,
    callbacks: list[EpochCallback] | None = None,
    progress: bool = True,
    restart_on_change: bool = False,
    init_require: str | None = None,
) -> TrainResult:
    """Train one stage on ``train.splits`` of ``index``; validate on ``train.val_split``.

    ``budget_s`` / ``max_steps`` override ``train.budget_s`` and epochs x steps_per_epoch.
    A ``last.pt`` from other settings or data is an error, unless ``restart_on_change``
    (the orchestrated path, where every finished model is already in the registry): then
    training starts over in the same folder. ``result.trained`` says whether any step ran.
    ``init_require`` ("encoder" | "model") makes the start weights fail to load unless
    every encoder (model) tensor is in the file.
    """
    tp = params.train
    out = Path(out_dir or tp.out_dir)
    budget = budget_s if budget_s is not None else tp.budget_s
    total_steps = max_steps or tp.epochs * tp.steps_per_epoch
    if tp.threads:
        torch.set_num_threads(tp.threads)
    seed_everything(params.seed)
    codec = MaskCodec.from_params(params)
    train_items = select_items(index, tp.splits, tp.datasets)
    val_items = select_items(index, [tp.val_split], tp.datasets)
    if not train_items:
        where = f" of sub-datasets {tp.datasets}" if tp.datasets else ""
        raise ValueError(f"train.splits {tp.splits}: no labelled images in these splits{where}")
    init = _init_path(params, init_weights)
    fp = _fingerprint(params, train_items, val_items, init, index)
    # start weights come only from ``init`` (it already names model.weights when set)
    model = model_from_params(params.model.model_copy(update={"weights": None}), params.num_classes)
    if init:
        rep = load_weights(model, init, require=init_require)
        log.info(
            "start weights %s: %d of %d tensors (encoder %d of %d)",
            init,
            rep["loaded"],
            rep["total"],
            rep["encoder_loaded"],
            rep["encoder_total"],
        )
    groups = _param_groups(model, tp.encoder, tp.encoder_lr_mult)
    opt = torch.optim.AdamW(groups, lr=tp.lr, weight_decay=tp.weight_decay)
    loss_fn = SegLoss(tp.loss)
    bf16 = use_bf16(tp.precision)
    cfg = model_config(params)

    step, epoch, best, best_epoch, elapsed0, history, resumed = 0, 0, -math.inf, -1, 0.0, [], False
    last_path = out / "last.pt"
    state = read_checkpoint(last_path)[0] if tp.resume and last_path.is_file() else None
    if state is not None and state.get("fingerprint") != fp and restart_on_change:
        log.info("%s: settings or data changed; training starts over", last_path)
        state = None
        (out / "best.json").unlink(missing_ok=True)  # its score belongs to the old run
    if state is not None and set(state["model"]) != set(model.state_dict()):
        # written by a version that built this model with other tensors (e.g. before a
        # shallow encoder dropped the stages it never runs): it cannot resume
        log.info("%s: the model's layout changed since; training starts over", last_path)
        state = None
        (out / "best.json").unlink(missing_ok=True)
    if state is not None:
        if state.get("fingerprint") != fp:
            raise ValueError(
                f"{last_path}: holds a run with other settings, data or start weights (its "
                "model is not in a registry, tracking being off); set train.out_dir (or the "
                "stage's train.out_dir) to a new folder, or train.resume: false to start over"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch = int(state["step"]), int(state["epoch"])
        best, best_epoch = float(state["best_miou"]), int(state["best_epoch"])
        elapsed0, history, resumed = float(state["elapsed_s"]), list(state["history"]), True
        # best.pt is written before last.pt: a run killed between the two has a newer best
        best_cfg = out / "best.json"
        if best_cfg.is_file():
            saved = read_json(best_cfg)
            if float(saved.get("score", -math.inf)) > best:
                best, best_epoch = float(saved["score"]), int(saved["epoch"])
        log.info("resumed %s at epoch %d, step %d (best mIoU %.4f)", last_path, epoch, step, best)
        if _run_done(state, total_steps, budget):
            best_miou = best if val_items else math.nan
            return TrainResult(
                out, best_miou, best_epoch, epoch, step, elapsed0, history, True, trained=False
            )

    train_samples = load_samples(train_items, codec, "load train", progress)
    val_samples = load_samples(val_items, codec, "load val", progress)
    sampler = TileSampler(
        train_samples,
        tp.tile_size,
        tp.steps_per_epoch * tp.batch_size,
        params.num_classes,
        tp.augment,
        tp.rare_crop_prob,
        params.seed,
    )
    loader = torch.utils.data.DataLoader(sampler, batch_size=tp.batch_size, num_workers=0)
    sp = tp.semi
    unl_iter, unl_tiles = None, None
    if sp.enabled:
        ub = sp.batch_size or max(1, tp.batch_size // 2)
        unl_tiles = UnlabeledTiles(
            _semi_paths(params, index),
            tp.tile_size,
            tp.steps_per_epoch * ub,
            params.seed + 1,
            f" (train.semi.include_labeled_splits {sp.include_labeled_splits}, "
            f"{params.data.index_path})",
        )
        unl_loader = torch.utils.data.DataLoader(unl_tiles, batch_size=ub, num_workers=0)
        gen = torch.Generator().manual_seed(params.seed)
    t0 = time.monotonic() - elapsed0

    def elapsed() -> float:
        return time.monotonic() - t0

    def out_of_budget() -> bool:
        return step >= total_steps or (budget is not None and elapsed() >= budget)

    start_step = step
    while not out_of_budget():
        sampler.set_epoch(epoch)
        if unl_tiles is not None:
            unl_tiles.set_epoch(epoch)
            unl_iter = iter(unl_loader)
            gen.manual_seed(params.seed * 1000003 + epoch)
        _train_mode(model, tp.encoder)
        losses, unl_losses, confident = [], [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
        for x, y in bar:
            prog = (
                step / total_steps
                if budget is None
                else max(step / total_steps, elapsed() / budget)
            )
            lr = tp.lr * lr_factor(prog, step, tp.warmup_steps, tp.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            ch = params.model.in_channels
            if unl_iter is not None:
                u = next(unl_iter)
                model.eval()  # pseudo-labels from running BN statistics; no BN update here
                with torch.no_grad(), autocast_ctx(bf16):
                    probs_weak = model(u.expand(-1, ch, -1, -1)).float().softmax(1)
                _train_mode(model, tp.encoder)
                strong = strong_augment(u, sp.strength, sp.cutout, gen)
                with autocast_ctx(bf16):
                    both = model(torch.cat([x, strong]).expand(-1, ch, -1, -1))
                logits, logits_u = both[: len(x)], both[len(x) :]
                loss_u, share = fixmatch_loss(logits_u, probs_weak, sp.threshold, sp.class_balance)
                loss_sup = loss_fn(logits, y)
                loss = loss_sup + sp.weight * ramp(step, sp.rampup_steps) * loss_u
                unl_losses.append(float(loss_u.detach()))
                confident.append(share)
            else:
                with autocast_ctx(bf16):
                    logits = model(x.expand(-1, ch, -1, -1))
                loss = loss_sup = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step}; lower train.lr ({tp.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss_sup.detach()))  # supervised part: comparable across runs
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
            if out_of_budget():
                break
        epoch += 1
        rec: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "lr": lr,
            "elapsed_s": round(elapsed(), 1),
        }
        if unl_losses:
            rec.update(
                unlabeled_loss=float(np.mean(unl_losses)), confident_share=float(np.mean(confident))
            )
        if val_samples:
            scores = validate(model, val_samples, params, bf16)
            rec.update(val_miou=scores["miou"], val_iou=scores["iou"], val_mdice=scores["mdice"])
            score = scores["miou"]
        else:
            # no validation images: keep the lowest-loss weights, report no val score
            score = -rec["train_loss"]
        if score > best:
            best, best_epoch = score, epoch
            save_checkpoint(
                out / "best.pt",
                model,
                {
                    **cfg,
                    "epoch": epoch,
                    "step": step,
                    "val_miou": rec.get("val_miou"),
                    "score": score,
                },
            )
        history.append(rec)
        finished = out_of_budget()
        save_checkpoint(
            last_path,
            model,
            {**cfg, "epoch": epoch, "step": step},
            {
                "optimizer": opt.state_dict(),
                "step": step,
                "epoch": epoch,
                "best_miou": best,
                "best_epoch": best_epoch,
                "elapsed_s": elapsed(),
                "history": history,
                "fingerprint": fp,
                "finished": finished,
            },
        )
        if progress:
            val = f"val mIoU {rec['val_miou']:.4f}" if "val_miou" in rec else "no val images"
            tqdm.write(
                f"epoch {epoch}: step {step}, loss {rec['train_loss']:.4f}, {val}, "
                f"{rec['elapsed_s']:.0f}s"
            )
        for cb in callbacks or []:
            cb(rec)
    best_miou = best if val_samples else math.nan
    result = TrainResult(
        out,
        best_miou,
        best_epoch,
        epoch,
        step,
        elapsed(),
        history,
        resumed,
        trained=step > start_step,
    )
    atomic_write_json(out / "train_metrics.json", result.summary())
    return result
