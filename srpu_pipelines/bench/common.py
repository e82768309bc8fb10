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
    # model: auto is planned from this run's budget, as the stages plan from train's
    mt = tp if setup.model_train is not None else None
    return setup.model_copy(update={"train": tp, "model_train": mt})


def drop_weights(folder: Path, keep: str | None = None) -> None:
    """Delete a finished run's checkpoints in ``folder`` (all but ``keep``): at ~90 MB a
    run, a benchmark would otherwise leave several GB behind. Metrics stay."""
    for f in folder.glob("*.pt"):
        if f.name != keep:
            f.unlink()


def subset_index(index: dict[str, Any], labeled_ids: set[str]) -> dict[str, Any]:
    """``index`` with only ``labeled_ids`` left labelled in the train split; the other
    train images join the pool as unlabelled images (their masks are never read)."""
    keys = (
        "id",
        "name",
        "dataset",
        "image",
        "image_sha256",
        "height",
        "width",
        "data_bar_rows",
        "pixel_size_nm",
    )
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


def peer_layout(
    p: Params, index: dict[str, Any], root: Path, train: list[str], test: list[str]
) -> Path:
    """The index's images in the peer loop's layout: ``root/train`` (splits ``train``) and
    ``root/test`` (splits ``test``) of NNN.tif + NNN_mask.tif, grey 8-bit images and
    class-index masks decoded by SRPU's codec, so both loops see the same pixels and
    labels (unlabelled pixels become class 0: the peer has no ignore label). A folder
    written from the same items is reused."""
    import shutil

    from PIL import Image

    from srpu_pipelines.data.imageio import read_grey
    from srpu_pipelines.data.index import select_items
    from srpu_pipelines.data.masks import MaskCodec, item_mask
    from srpu_pipelines.io.files import atomic_write_json, read_json

    done = root / "layout.json"
    parts = {"train": select_items(index, train), "test": select_items(index, test)}
    want = {s: [[it["id"], it["mask_sha256"]] for it in its] for s, its in parts.items()}
    if done.is_file() and read_json(done) == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    codec = MaskCodec.from_params(p)
    for split, items in parts.items():
        for k, it in enumerate(items):
            out = root / split / f"{k:03d}"
            img = (np.clip(read_grey(Path(it["image"])), 0, 1) * 255).astype(np.uint8)
            mask = item_mask(it, codec)
            mask[mask == 255] = 0
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(f"{out}.tif")
            Image.fromarray(mask.astype(np.uint8)).save(f"{out}_mask.tif")
    atomic_write_json(done, want)
    return root


def run_peer(
    script: Path,
    data: Path,
    classes: int,
    seed: int,
    steps: int | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """One run of the peer loop in its own process: its JSON line (steps, train_s,
    per_class_iou, miou). A step budget wins over a time budget (as in the peer)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(script), str(data), "--classes", str(classes), "--decode", "index"]
    cmd += ["--seed", str(seed)]
    cmd += ["--steps", str(steps)] if steps else ["--budget-s", str(budget_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
