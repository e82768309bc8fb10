"""Benchmarks that print JSON: fixed budgets, several seeds, scores on the test split."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.config import Params
from srpu_pipelines.data.index import build_index
from srpu_pipelines.training.trainer import train_stage

_UNBOUNDED = 10**9


def _spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(a.mean()), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "range": round(float(a.max() - a.min()), 4),
    }


def bench_supervised(
    params: Params,
    seeds: int,
    budget_s: float | None,
    steps: int | None,
    work_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train from scratch on ``train.splits`` per seed under the budget; score ``evaluate.split``.

    Training time includes the per-epoch validation used to pick the best checkpoint;
    the final test scoring is outside the budget. Each seed starts from an empty folder.
    """
    index = build_index(params, show_progress=False)
    runs = []
    for seed in range(seeds):
        p = params.model_copy(deep=True)
        p.seed = seed
        out = work_dir / f"seed{seed}"
        if out.exists():
            shutil.rmtree(out)  # a benchmark run always starts from scratch
        res = train_stage(
            p,
            index,
            out_dir=out,
            budget_s=budget_s,
            max_steps=steps or _UNBOUNDED,
            progress=progress,
        )
        m = evaluate_checkpoint(
            p, index, res.best_checkpoint, out_dir=out / "eval", progress=progress
        )
        runs.append(
            {
                "seed": seed,
                "steps": res.steps,
                "train_s": round(res.train_seconds, 1),
                "best_epoch": res.best_epoch,
                "val_miou": round(res.best_miou, 4),
                "per_class_iou": {k: round(v, 4) for k, v in m["iou"].items()},
                "miou": round(m["miou"], 4),
            }
        )
    names = params.class_names
    return {
        "bench": "supervised",
        "model": params.model.model_dump(mode="json"),
        "budget_s": budget_s,
        "step_budget": steps,
        "test_split": params.evaluate.split,
        "runs": runs,
        "miou": _spread([r["miou"] for r in runs]),
        "per_class_iou": {n: _spread([r["per_class_iou"][n] for r in runs]) for n in names},
        "steps": _spread([r["steps"] for r in runs]),
    }


SSL_ARMS = ("scratch", "mae", "mae_semi")


def _drop_weights(folder: Path, keep: str | None = None) -> None:
    """Delete a finished run's checkpoints in ``folder`` (all but ``keep``): at ~90 MB a
    run, a benchmark would otherwise leave several GB behind. Metrics stay."""
    for f in folder.glob("*.pt"):
        if f.name != keep:
            f.unlink()


def subset_index(index: dict[str, Any], labeled_ids: set[str]) -> dict[str, Any]:
    """``index`` with only ``labeled_ids`` left labelled in the train split; the other
    train images join the pool as unlabelled images (their masks are never read)."""
    keys = ("id", "name", "dataset", "image", "image_sha256", "height", "width")
    items, pool = [], list(index.get("pool", []))
    for it in index["items"]:
        if it["split"] != "train" or it["id"] in labeled_ids:
            items.append(it)
        else:
            pool.append({k: it[k] for k in keys if k in it})
    return {**index, "items": items, "pool": pool}


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
    from srpu_pipelines.data.index import select_items
    from srpu_pipelines.training.pretrain import pretrain_mae

    index = build_index(params, show_progress=False)
    train_ids = sorted(it["id"] for it in select_items(index, ["train"]))
    if max(ks) > len(train_ids):
        raise ValueError(f"bench ssl: k up to {max(ks)} but the train split has {len(train_ids)}")
    mae_info: dict[str, Any] = {}
    encoder = None
    if any(a.startswith("mae") for a in arms):
        mae_dir = work_dir / "mae"
        if mae_dir.exists():
            shutil.rmtree(mae_dir)
        pres = pretrain_mae(
            params,
            index,
            out_dir=mae_dir,
            budget_s=mae_budget_s,
            max_steps=mae_steps,  # None: pretrain.epochs x steps_per_epoch
            progress=progress,
        )
        encoder = pres.encoder_checkpoint
        mae_info = {k: v for k, v in pres.summary().items() if k != "history"}
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
                    p,
                    sub,
                    out_dir=out,
                    init_weights=encoder if arm != "scratch" else None,
                    init_require="encoder" if arm != "scratch" else None,
                    budget_s=budget_s,
                    max_steps=steps or _UNBOUNDED,
                    progress=progress,
                )
                m = evaluate_checkpoint(
                    p, sub, res.best_checkpoint, out_dir=out / "eval", progress=progress
                )
                _drop_weights(out)  # scored: the figures are all this benchmark keeps
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
                "miou": _spread([r["miou"] for r in rs]),
                "steps": _spread([r["steps"] for r in rs]),
            }
    # paired by seed (same labelled images): each arm minus scratch
    paired: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm == "scratch" or "scratch" not in arms:
            continue
        for k in ks:
            base = {r["seed"]: r["miou"] for r in runs if r["arm"] == "scratch" and r["k"] == k}
            diffs = [r["miou"] - base[r["seed"]] for r in runs if r["arm"] == arm and r["k"] == k]
            paired.setdefault(f"{arm}-scratch", {})[f"k{k}"] = _spread(diffs)
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
