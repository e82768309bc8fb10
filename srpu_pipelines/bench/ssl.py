"""``srpu bench ssl``: label efficiency of MAE pretraining and semi-supervised training."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.bench.common import drop_weights, run_setup, spread, subset_index
from srpu_pipelines.config import Params, pretrain_setup
from srpu_pipelines.data.index import build_index, select_items
from srpu_pipelines.errors import InputError
from srpu_pipelines.training.plan import plan_model
from srpu_pipelines.training.pretrain import pretrain_mae, pretrain_summary
from srpu_pipelines.training.trainer import train_stage

SSL_ARMS = ("scratch", "mae", "mae_semi")


def bench_ssl(
    params: Params,
    ks: list[int],
    seeds: int,
    budget_s: float | None,
    steps: int | None,
    mae_budget_s: float | None,
    mae_steps: int | None,
    work_dir: Path,
    arms: tuple[str, ...] = SSL_ARMS,
    progress: bool = True,
) -> dict[str, Any]:
    """Label-efficiency benchmark: for each seed and k, k labelled train images (nested:
    the k=1 image is among the k=2 ones), fine-tuned under the same budget from scratch,
    from the MAE encoder, and from the MAE encoder with semi-supervised training on the
    remaining train images (their pixels only); test mIoU per arm and k.

    The MAE encoder is pretrained once (seed ``params.seed``) on ``pretrain.splits``
    images and the pool; the validation split picks each run's best epoch.
    """
    index = build_index(params, show_progress=False)
    if params.model.is_auto:  # one model for the MAE encoder and every run it starts
        tp = run_setup(params, work_dir / "model_plan", budget_s, steps).train
        mp = plan_model(params.model, tp, params.class_names, index, save=False)[0]
        params = params.model_copy(update={"model": mp})
    train_ids = sorted(it["id"] for it in select_items(index, ["train"]))
    if max(ks) > len(train_ids):
        raise InputError(f"bench ssl: k up to {max(ks)} but the train split has {len(train_ids)}")
    mae_info: dict[str, Any] = {}
    encoder = None
    if any(a.startswith("mae") for a in arms):
        mae_dir = work_dir / "mae"
        if mae_dir.exists():
            shutil.rmtree(mae_dir)
        pp = params.pretrain.model_copy(
            update={"out_dir": mae_dir, "budget_s": mae_budget_s, "max_steps": mae_steps}
        )  # no budget given: pretrain.epochs x steps_per_epoch
        setup = pretrain_setup(params).model_copy(update={"pretrain": pp})
        pres = pretrain_mae(setup, index, progress=progress)
        encoder = pres.encoder_checkpoint
        mae_info = {k: v for k, v in pretrain_summary(pres).items() if k != "history"}
    runs = []
    for seed in range(seeds):
        order = list(np.random.default_rng(seed).permutation(train_ids))
        for k in ks:
            sub = subset_index(index, set(order[:k]))
            for arm in arms:
                p = params.model_copy(deep=True)
                p.seed = seed
                p.evaluate.overlays = 0
                p.train.semi.enabled = arm == "mae_semi"
                out = work_dir / f"seed{seed}" / f"k{k}" / arm
                if out.exists():
                    shutil.rmtree(out)
                res = train_stage(
                    run_setup(p, out, budget_s, steps),
                    sub,
                    init_weights=encoder if arm != "scratch" else None,
                    init_require="encoder" if arm != "scratch" else None,
                    progress=progress,
                )
                m = evaluate_checkpoint(
                    p, sub, res.best_checkpoint, out_dir=out / "eval", progress=progress
                )
                drop_weights(out)  # scored: the figures are all this benchmark keeps
                runs.append(
                    {
                        "seed": seed,
                        "k": k,
                        "arm": arm,
                        "labeled": order[:k],
                        "steps": res.steps,
                        "train_s": round(res.train_seconds, 1),
                        "val_miou": round(res.best_miou, 4),
                        "per_class_iou": {c: round(v, 4) for c, v in m["iou"].items()},
                        "miou": round(m["miou"], 4),
                    }
                )
                if progress:
                    print(f"seed {seed} k {k} {arm}: test mIoU {m['miou']:.4f}", flush=True)
    table: dict[str, dict[str, Any]] = {}
    for arm in arms:
        for k in ks:
            rs = [r for r in runs if r["arm"] == arm and r["k"] == k]
            table.setdefault(arm, {})[f"k{k}"] = {
                "miou": spread([r["miou"] for r in rs]),
                "steps": spread([r["steps"] for r in rs]),
            }
    # paired by seed (same labelled images): each arm minus scratch
    paired: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm == "scratch" or "scratch" not in arms:
            continue
        for k in ks:
            base = {r["seed"]: r["miou"] for r in runs if r["arm"] == "scratch" and r["k"] == k}
            diffs = [r["miou"] - base[r["seed"]] for r in runs if r["arm"] == arm and r["k"] == k]
            paired.setdefault(f"{arm}-scratch", {})[f"k{k}"] = spread(diffs)
    return {
        "bench": "ssl",
        "model": params.model.model_dump(mode="json"),
        "budget_s": budget_s,
        "step_budget": steps,
        "mae": mae_info,
        "test_split": params.evaluate.split,
        "ks": ks,
        "seeds": seeds,
        "table": table,
        "paired_gain": paired,
        "runs": runs,
    }
