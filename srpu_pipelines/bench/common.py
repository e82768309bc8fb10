"""Helpers the benchmarks share: spreads over seeds, labelled subsets, weight clean-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from srpu_pipelines.config import DatasetSpec, Params, StageSetup, stage_setup

UNBOUNDED = 10**9  # a step budget that never binds (the time budget does)


def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(a.mean()), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "range": round(float(a.max() - a.min()), 4),
    }


def run_setup(
    params: Params, out_dir: Path, budget_s: float | None, steps: int | None
) -> StageSetup:
    """The sections a benchmark run trains with: ``params.train`` in ``out_dir`` under
    the budget (a time budget alone leaves the step count unbounded)."""
    setup = stage_setup(params)
    tp = setup.train.model_copy(
        update={
            "out_dir": out_dir,
            "budget_s": budget_s,
            "max_steps": steps or (UNBOUNDED if budget_s else None),
        }
    )
    return setup.model_copy(update={"train": tp})


def drop_weights(folder: Path, keep: str | None = None) -> None:
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


def on_demo_data(params: Params, work: Path, size: int | None = None) -> tuple[Params, dict]:
    """``params`` on a fresh copy of the synthetic demo data in ``work`` (micrographs of
    ``size`` px, default ``demo.size``), tracking off, and the index of that data."""
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.data.index import build_index, write_index

    p = params.model_copy(deep=True)
    p.demo.out_dir = work / "data"
    p.demo.size = size or p.demo.size
    generate_demo(p)
    p.data = p.data.model_copy(
        update={
            "datasets": [
                DatasetSpec(name=n, labeled=work / "data/labeled" / n, raw=work / "data/raw" / n)
                for n in p.demo.datasets
            ],
            "index_path": work / "index.json",
        }
    )
    p = Params.model_validate(p.model_dump())
    p.tracking.enabled = False
    index = build_index(p, show_progress=False)
    write_index(index, p.data.index_path)
    return p, index
