"""``srpu bench supervised``: training from scratch per seed under a budget, test scores."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.bench.common import run_setup, spread
from srpu_pipelines.config import Params
from srpu_pipelines.data.index import build_index
from srpu_pipelines.training.trainer import train_stage


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
        res = train_stage(run_setup(p, out, budget_s, steps), index, progress=progress)
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
        "miou": spread([r["miou"] for r in runs]),
        "per_class_iou": {n: spread([r["per_class_iou"][n] for r in runs]) for n in names},
        "steps": spread([r["steps"] for r in runs]),
    }
