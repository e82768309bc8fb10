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
