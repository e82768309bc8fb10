"""Pipeline steps shared by the two doors, Dagster assets and the CLI (and so `dvc repro`).

Each step reads params, calls one core function and records the result with a
:class:`~srpu_pipelines.resources.tracking.Tracker`. Steps hand over through files at
the paths in params (the index JSON, checkpoints, metrics JSON), so a step run from the
CLI and the same step run from Dagster produce and read the same things.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from srpu_pipelines.config import Params
from srpu_pipelines.io_utils import atomic_write_json, read_json
from srpu_pipelines.resources.tracking import ModelVersion, Tracker, flat_metrics

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"


def data_revision(index_path: str | Path) -> str:
    """Content hash of the index JSON: it names every file by its own hash."""
    return hashlib.sha256(Path(index_path).read_bytes()).hexdigest()[:16]


def model_record_path(params: Params) -> Path:
    return Path(params.train.out_dir) / "model_version.json"


def run_index(params: Params, progress: bool = True) -> dict[str, Any]:
    from srpu_pipelines.data.index import build_index, write_index

    idx = build_index(params, show_progress=progress)
    changed = write_index(idx, params.data.index_path)
    return {"index": idx, "changed": changed, "revision": data_revision(params.data.index_path)}


def run_train(
    params: Params, tracker: Tracker | None, progress: bool = True, **train_kw: Any
) -> dict[str, Any]:
    """Train one stage inside a tracked run; register the best checkpoint as ``challenger``."""
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.training.trainer import train_stage

    index = load_index(params.data.index_path)
    if tracker is None:
        res = train_stage(params, index, progress=progress, **train_kw)
        return {"result": res, "version": None}
    rev = data_revision(params.data.index_path)
    tags = {"srpu.stage": "train", "srpu.data_revision": rev}
    with tracker.start_run("train", params.resolved(), tags) as run_id:

        def log_epoch(rec: dict[str, Any]) -> None:
            m = {"train_loss": rec["train_loss"], "lr": rec["lr"]}
            if "val_miou" in rec:
                m.update(flat_metrics("val_", {"miou": rec["val_miou"], "iou": rec["val_iou"]}))
            tracker.log_metrics(m, step=rec["epoch"])

        res = train_stage(params, index, progress=progress, callbacks=[log_epoch], **train_kw)
        tracker.log_artifact(res.best_checkpoint, "checkpoint")
        tracker.log_artifact(res.best_checkpoint.with_suffix(".json"), "checkpoint")
        tracker.log_artifact(res.out_dir / "train_metrics.json")
        mv = tracker.log_model(
            res.best_checkpoint, {"val_miou": str(res.best_miou), "data_revision": rev}
        )
        tracker.set_alias(CHALLENGER, mv.version)
    record = {
        "run_id": run_id,
        "version": mv.version,
        "val_miou": res.best_miou,
        "data_revision": rev,
        "registered_model": tracker.registered_model,
    }
    atomic_write_json(model_record_path(params), record)
    return {"result": res, "version": mv, "record": record}


def run_evaluate(
    params: Params,
    tracker: Tracker | None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the trained checkpoint on ``evaluate.split``; log into its training run."""
    from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
    from srpu_pipelines.data.index import load_index

    ckpt = Path(checkpoint or Path(params.train.out_dir) / f"{params.evaluate.checkpoint}.pt")
    metrics = evaluate_checkpoint(
        params, load_index(params.data.index_path), ckpt, progress=progress
    )
    rec_path = model_record_path(params)
    if tracker is not None and rec_path.is_file():
        rec = read_json(rec_path)
        with tracker.start_run("evaluate", {}, {"srpu.evaluated": "true"}, run_id=rec["run_id"]):
            tracker.log_metrics(flat_metrics(f"{metrics['split']}_", metrics))
            out = Path(params.evaluate.out_dir)
            tracker.log_artifact(out / "metrics.json", "evaluation")
            for png in sorted((out / "overlays").glob("*.png")):
                tracker.log_artifact(png, "evaluation/overlays")
    return metrics


def champion_gate(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Is the newly trained model at least as good on validation as the champion?"""
    rec = read_json(model_record_path(params))
    champ = tracker.get_alias(CHAMPION)
    champ_miou = champ.val_miou if champ else None
    new = float(rec["val_miou"])
    passed = champ is None or champ_miou is None or new >= champ_miou
    return {
        "passed": passed,
        "candidate_version": rec["version"],
        "candidate_val_miou": new,
        "champion_version": champ.version if champ else None,
        "champion_val_miou": champ_miou,
    }


def promote(params: Params, tracker: Tracker) -> ModelVersion:
    """Give the newly trained version the ``champion`` alias (call only after the gate)."""
    rec = read_json(model_record_path(params))
    tracker.set_alias(CHAMPION, rec["version"])
    got = tracker.get_alias(CHAMPION)
    assert got is not None
    return got


def run_promote(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Gate, then promote when it passes; the decision is written to the train folder."""
    gate = champion_gate(params, tracker)
    if gate["passed"]:
        promote(params, tracker)
    atomic_write_json(Path(params.evaluate.out_dir) / "promotion.json", gate)
    return gate


def prediction_checkpoint(params: Params, tracker: Tracker | None) -> Path:
    """The checkpoint ``predict.source`` names: the champion's, or train.out_dir's."""
    if params.predict.source == "checkpoint":
        return Path(params.train.out_dir) / f"{params.evaluate.checkpoint}.pt"
    if tracker is None:
        raise ValueError(
            "predict.source: champion needs tracking.enabled: true (the registry); "
            "or set predict.source: checkpoint"
        )
    try:
        return tracker.fetch_checkpoint(CHAMPION, Path(params.predict.models_cache))
    except LookupError as e:
        raise ValueError(
            f"predict.source: champion: {e}; promote a model first "
            "(srpu promote) or set predict.source: checkpoint"
        ) from None
