"""One supervised training stage: tiles in, best and last checkpoints out, resumable.

The stage is a :class:`~srpu_pipelines.training.loop.Task` of the one loop: it supplies
the segmentation model and its start weights, random-crop batches (plus unlabelled
tiles when semi-supervised), the step's loss and the validation at an epoch's end. Each
epoch is ``train.steps_per_epoch`` optimiser steps; validation over the full-size
validation images (sliding windows) runs every ``train.val_every`` epochs while it takes
no more than ``train.val_time_share`` of the clock, and always after the last epoch.
``best.pt`` keeps the weights with the highest validation mIoU; ``last.pt`` everything
needed to resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srpu_pipelines.analysis.inference import input_scale, predict_labels
from srpu_pipelines.analysis.metrics import ConfusionAccumulator
from srpu_pipelines.config import StageSetup
from srpu_pipelines.data.dataset import Sample, TileSampler, load_samples
from srpu_pipelines.data.index import image_hashes, select_items
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.data.pool import UnlabeledTiles, bar_rows, unlabeled_paths
from srpu_pipelines.errors import InputError
from srpu_pipelines.io.files import atomic_write_json, read_json, sha256_file
from srpu_pipelines.models.checkpoint import model_config, read_checkpoint, save_checkpoint
from srpu_pipelines.models.factory import is_vit_encoder, load_weights, model_from_params
from srpu_pipelines.training.loop import (
    EXECUTION_KEYS,
    EpochCallback,
    Loop,
    RunResult,
    Task,
    run_task,
    task_is_finished,
)
from srpu_pipelines.training.losses import SegLoss
from srpu_pipelines.training.plan import plan_stage, unset_train_keys
from srpu_pipelines.training.semi import WeakStrongPairs, fixmatch_loss, ramp

log = logging.getLogger(__name__)
# training/validation/metrics-only keys that do not change what the stage learns
_NOT_LEARNED = {"val_time_share"}


def validate(
    model: nn.Module, samples: list[Sample], setup: StageSetup, loop: Loop
) -> dict[str, Any]:
    """Scores over full-size images on the model's device: per-class IoU/Dice, means.
    Each image is scored at its own pixels, as evaluation does (a model trained on
    resampled pixels sees it resampled and its probabilities come back)."""
    inf = setup.inference
    config = model_config(setup)  # what the checkpoint will say of its pixels
    acc = ConfusionAccumulator(setup.num_classes)
    for s in samples:
        pred = predict_labels(
            model,
            s.normalized,
            input_scale(config, s.pixel_size_nm),
            tile=inf.tile_size,
            overlap=inf.overlap,
            batch_size=inf.batch_size,
            precision=loop.rt.precision,
            in_channels=setup.model.in_channels,
            channels_last=loop.rt.channels_last,
        )
        acc.update(pred, s.mask)
    return acc.scores(setup.class_names)


def start_pixels(path: str | Path) -> tuple[bool, float | None, float]:
    """(whether ``path`` holds a whole SRPU model, the pixel size in nm it was trained at:
    None for the images' own pixels, the factor it enlarged them by). An encoder (MAE) or
    a bare state_dict is no whole model: it has learnt no scale to keep."""
    path = Path(path)
    beside = path.with_suffix(".json")
    config = read_json(beside) if beside.is_file() else None
    if config is None:  # a registry copy carries its config inside the .pt
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad file; name the file
            raise InputError(f"start weights {path}: not a loadable state_dict ({e})") from None
        config = obj.get("config") if isinstance(obj, dict) else None
    if not isinstance(config, dict) or "class_names" not in config:
        return False, None, 1.0
    if config.get("kind") == "encoder":
        return False, None, 1.0
    nm = config.get("resample_nm")
    return True, float(nm) if nm else None, float(config.get("upsample") or 1.0)


def param_groups(model: nn.Module, mode: str, mult: float) -> list[dict[str, Any]]:
    """Optimiser groups for ``train.encoder``: full, frozen (encoder left out and fixed) or
    differential (encoder at lr x mult), each with its ``lr_scale``."""
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    if mode == "full":
        return [{"params": enc + rest, "lr_scale": 1.0}]
    if mode == "frozen":
        for p in enc:
            p.requires_grad_(False)
        return [{"params": rest, "lr_scale": 1.0}]
    return [{"params": enc, "lr_scale": mult}, {"params": rest, "lr_scale": 1.0}]


class StageTask(Task):
    """A supervised stage on ``train.splits`` of ``index``, validated on ``train.val_split``.

    A ``last.pt`` from other settings or data is an error, unless ``restart_on_change``
    (the orchestrated path, where every finished model is already in the registry): then
    training starts over in the same folder. ``init_require`` ("encoder" | "model") makes
    the start weights fail to load unless every encoder (model) tensor is in the file.
    """

    kind = "train"

    def __init__(
        self,
        setup: StageSetup,
        index: dict[str, Any],
        init_weights: str | Path | None = None,
        init_require: str | None = None,
        restart_on_change: bool = False,
    ) -> None:
        start = init_weights or setup.model.weights
        tp0 = setup.train
        if "auto" in (tp0.resample_nm, tp0.upsample) and start and Path(start).is_file():
            whole, nm, up = start_pixels(start)
            if whole:  # a warm start goes on at the pixels its weights learnt at
                keep: dict[str, Any] = {}
                if tp0.resample_nm == "auto":
                    keep["resample_nm"] = nm
                    log.info(
                        "train.resample_nm auto: %s, kept from the start weights %s",
                        f"{nm:g} nm" if nm else "the images' own pixels",
                        start,
                    )
                if tp0.upsample == "auto":
                    keep["upsample"] = up
                    log.info("train.upsample auto: %g, kept from the start weights %s", up, start)
                setup = setup.model_copy(update={"train": tp0.model_copy(update=keep)})
        saved = Path(setup.train.out_dir) / "plan.json"
        previous = read_json(saved) if saved.is_file() else None
        setup, self.plan = plan_stage(setup, index, previous)  # the keys left ``auto``
        super().__init__(setup.train, setup.seed)
        self.setup, self.index, self.tp = setup, index, setup.train
        self.init_require, self.restart_on_change = init_require, restart_on_change
        tp = self.tp
        self.out = Path(tp.out_dir)
        self.train_items = select_items(index, tp.splits, tp.datasets)
        self.val_items = select_items(index, [tp.val_split], tp.datasets)
        if not self.train_items:
            where = f" of sub-datasets {tp.datasets}" if tp.datasets else ""
            raise InputError(f"train.splits {tp.splits}: no labelled images in these splits{where}")
        self.init = str(start) if start else None
        self.find_unused_parameters = is_vit_encoder(setup.model.encoder)
        self.val_seconds = 0.0
        self._best: tuple[dict[str, Any], dict[str, Any]] | None = None  # not yet on disk
        self._fingerprint: str | None = None

    def _semi_paths(self) -> list[str]:
        sp, tp = self.tp.semi, self.tp
        return unlabeled_paths(self.index, True, sp.include_labeled_splits, tp.datasets)

    def fingerprint(self) -> str:
        """Settings, data (by content) and the start weights (by content, so a retrained
        earlier stage re-runs the stages after it)."""
        tp = self.tp
        # keep_start off is left out, so runs saved before the key existed still resume;
        # likewise resample_nm null and upsample 1
        off = unset_train_keys(tp) | (set() if tp.keep_start else {"keep_start"})
        t = tp.model_dump(mode="json", exclude=EXECUTION_KEYS | _NOT_LEARNED | off)
        hashes = image_hashes(self.index)
        init = self.init
        blob = {
            "model": model_config(self.setup),
            "train": t,
            "seed": self.seed,
            "init": sha256_file(init) if init and Path(init).is_file() else init,
            "train_data": [
                (i["id"], i["image_sha256"], i["mask_sha256"]) for i in self.train_items
            ],
            "val_data": [(i["id"], i["image_sha256"], i["mask_sha256"]) for i in self.val_items],
            "unlabeled": [hashes.get(p, p) for p in self._semi_paths()] if tp.semi.enabled else [],
        }
        if tp.resample_size:  # the pixels trained and validated on depend on them
            blob["pixel_sizes"] = [
                i.get("pixel_size_nm") for i in self.train_items + self.val_items
            ]
        if tp.keep_start:  # whether the start competes for best.pt depends on what it is
            blob["init_require"] = self.init_require
        self._fingerprint = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def config(self) -> dict[str, Any]:
        return model_config(self.setup)

    def outputs_exist(self) -> bool:
        return (self.out / "best.pt").is_file()

    def mismatch_error(self, last: Path) -> Exception:
        return ValueError(
            f"{last}: holds a run with other settings, data or start weights (its "
            "model is not in a registry, tracking being off); set train.out_dir (or the "
            "stage's train.out_dir) to a new folder, or train.resume: false to start over"
        )

    def on_restart(self) -> None:
        (self.out / "best.json").unlink(missing_ok=True)  # its score belongs to the old run

    def recover_best(self, best: float, epoch: int) -> tuple[float, int]:
        # best.pt is written before last.pt: a run killed between the two has a newer best.
        # Its score is read from the .pt itself (the .json beside it is written first, so
        # a kill during the .pt write would otherwise vouch for weights not on disk)
        path = self.out / "best.pt"
        if path.is_file():
            saved = read_checkpoint(path)[0].get("config", {})
            mine = saved.get("fingerprint") == self._fingerprint  # not an earlier run's
            if mine and float(saved.get("score", -math.inf)) > best:
                return float(saved["score"]), int(saved["epoch"])
        return best, epoch

    def build(self) -> nn.Module:
        # start weights come only from ``init`` (it already names model.weights when set)
        mp = self.setup.model.model_copy(update={"weights": None})
        model = model_from_params(mp, self.setup.num_classes)
        if self.init:
            rep = load_weights(model, self.init, require=self.init_require)
            log.info(
                "start weights %s: %d of %d tensors (encoder %d of %d)",
                self.init,
                rep["loaded"],
                rep["total"],
                rep["encoder_loaded"],
                rep["encoder_total"],
            )
        return model

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return param_groups(module, self.tp.encoder, self.tp.encoder_lr_mult)

    def on_train_start(self, loop: Loop) -> None:
        tp, setup = self.tp, self.setup
        if self.plan is not None and loop.dist.is_main:
            atomic_write_json(self.out / "plan.json", self.plan.as_dict())
        codec = MaskCodec.from_params(setup)
        progress = loop.progress and loop.dist.is_main
        target, up = tp.resample_size, tp.upsample_factor
        train_samples = load_samples(
            self.train_items, codec, "load train", progress, resample_nm=target, upsample=up
        )
        if (target or up != 1.0) and tp.semi.enabled:
            log.warning(
                "train.resample_nm %s, train.upsample %g: the labelled images are resampled, "
                "the unlabelled tiles of train.semi are not (they keep their own pixels)",
                target,
                up,
            )
        self.val_samples = load_samples(self.val_items, codec, "load val", progress)
        tiles = TileSampler(
            train_samples,
            tp.tile_size,
            tp.steps_per_epoch * tp.batch_size,
            setup.num_classes,
            tp.augment,
            tp.rare_crop_prob,
            self.seed,
        )
        self.loaders = [loop.loader(tiles, tp.batch_size, "train.batch_size")]
        sp = tp.semi
        if sp.enabled:
            ub = sp.batch_size or max(1, tp.batch_size // 2)
            unl = UnlabeledTiles(
                self._semi_paths(),
                tp.tile_size,
                tp.steps_per_epoch * ub,
                self.seed + 1,
                f" (train.semi.include_labeled_splits {sp.include_labeled_splits})",
                bars=bar_rows(self.index),
            )
            pairs = WeakStrongPairs(unl, sp.strength, sp.cutout)
            self.loaders.append(loop.loader(pairs, ub, "train.semi.batch_size"))
        self.loss_fn = SegLoss(tp.loss, setup.class_names).to(loop.rt.device)

    def batches(self, loop: Loop, epoch: int):
        for ld in self.loaders:
            ld.sampler.set_epoch(epoch)
        return zip(*self.loaders, strict=True) if len(self.loaders) > 1 else self.loaders[0]

    def train_mode(self, module: nn.Module) -> None:
        module.train()
        if self.tp.encoder == "frozen":
            module.encoder.eval()  # keep the start weights' BatchNorm statistics too

    def train_step(self, loop: Loop, module: nn.Module, batch: Any):
        ch = self.setup.model.in_channels
        if len(self.loaders) == 1:
            x, y = loop.to_device(batch[0]), loop.to_device(batch[1])
            loss = self.loss_fn(module(x.expand(-1, ch, -1, -1)), y)
            return loss, {"train_loss": loss.detach()}  # a tensor: read at the epoch's end
        (x, y), (weak, strong) = batch
        x, y = loop.to_device(x), loop.to_device(y)
        weak, strong = loop.to_device(weak), loop.to_device(strong)
        sp = self.tp.semi
        loop.model.eval()  # pseudo-labels from running BN statistics; no BN update here
        with torch.no_grad():
            probs_weak = module(weak.expand(-1, ch, -1, -1)).float().softmax(1)
        self.train_mode(loop.model)
        both = module(torch.cat([x, strong]).expand(-1, ch, -1, -1))
        logits, logits_u = both[: len(x)], both[len(x) :]
        loss_u, share = fixmatch_loss(logits_u, probs_weak, sp.threshold, sp.class_balance)
        loss_sup = self.loss_fn(logits, y)
        loss = loss_sup + sp.weight * ramp(loop.step, sp.rampup_steps) * loss_u
        return loss, {
            "train_loss": loss_sup.detach(),  # comparable across runs
            "unlabeled_loss": loss_u.detach(),
            "confident_share": share,
        }

    def score_start(self, loop: Loop) -> float | None:
        # only a whole trained model: an encoder alone (MAE) with a fresh decoder scores
        # nothing worth keeping
        if not self.tp.keep_start:
            return None
        if self.init_require != "model" or not self.val_samples:
            why = "no validation images" if self.init_require == "model" else "no whole model"
            log.info("train.keep_start: nothing to keep (%s to start from)", why)
            return None
        score = self._validate(loop, timed=False)["miou"]
        log.info("start weights %s: val mIoU %.4f, kept unless training beats it", self.init, score)
        return score

    def _validate(self, loop: Loop, timed: bool = True) -> dict[str, Any]:
        # timed: counts towards val_time_share (the start's scoring is outside the clock)
        t = time.monotonic()
        scores = validate(loop.eval_model, self.val_samples, self.setup, loop)
        self.train_mode(loop.model)
        if timed:
            self.val_seconds += time.monotonic() - t
        return scores

    def on_epoch_end(self, loop: Loop, rec: dict[str, Any]) -> float | None:
        if not self.val_samples:
            # no validation images: keep the lowest-loss weights, report no val score
            return -rec["train_loss"]
        tp = self.tp
        due = (
            loop.epoch % tp.val_every == 0
            and self.val_seconds <= tp.val_time_share * loop.elapsed()
        )
        if not (due or loop.finishing):
            return None
        scores = self._validate(loop)
        rec.update(val_miou=scores["miou"], val_iou=scores["iou"], val_mdice=scores["mdice"])
        return scores["miou"]

    def save_best(self, loop: Loop, rec: dict[str, Any]) -> None:
        # kept in memory and written with the next last.pt (save_outputs): the two on disk
        # always belong together, and a run writes weights only as often as it checkpoints
        meta = {
            "epoch": loop.epoch,
            "step": loop.step,
            "val_miou": rec.get("val_miou"),
            "fingerprint": loop.fingerprint,
        }
        state = loop.eval_model.state_dict()
        weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self._best = (weights, {**self.config(), **meta, "score": loop.best})

    def save_outputs(self, loop: Loop, rec: dict[str, Any]) -> None:
        if self._best is not None:
            save_checkpoint(self.out / "best.pt", *self._best)
            self._best = None

    def summarize(self, result: RunResult) -> None:
        if not self.val_items:
            result.best_score = math.nan  # the lowest loss picked best.pt, not a score

    def on_train_end(self, loop: Loop, result: RunResult) -> None:
        result.info["validation_seconds"] = round(self.val_seconds, 1)
        if loop.start_score is not None:
            result.info["start_val_miou"] = loop.start_score
        if self.plan is not None:
            result.info["plan"] = self.plan.as_dict()
        atomic_write_json(self.out / "train_metrics.json", train_summary(result))


def train_summary(result: RunResult) -> dict[str, Any]:
    return {
        "best_val_miou": result.best_miou if math.isfinite(result.best_miou) else None,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "history": result.history,
        "start_val_miou": result.info.get("start_val_miou"),  # keep_start: the start's score
        "plan": result.info.get("plan"),
    }


def train_stage(
    setup: StageSetup,
    index: dict[str, Any],
    init_weights: str | Path | None = None,
    init_require: str | None = None,
    restart_on_change: bool = False,
    callbacks: list[EpochCallback] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train one stage (see :class:`StageTask`); the budget is ``train.max_steps`` (or
    epochs x steps_per_epoch) and ``train.budget_s``. ``result.trained`` says whether any
    step ran."""
    task = StageTask(setup, index, init_weights, init_require, restart_on_change)
    return run_task(task, callbacks, progress)


def is_finished(
    setup: StageSetup, index: dict[str, Any], init_weights: str | Path | None = None
) -> bool:
    """True when ``train_stage`` with these arguments would find its run done."""
    return task_is_finished(StageTask(setup, index, init_weights))
