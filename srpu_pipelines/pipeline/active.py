"""Active-learning steps shared by the Dagster assets and the CLI: score the pool with the
champion, select the next batch and write the round folder.

The model is the registry's champion (``active`` scores are stored with its version);
without tracking, the final stage's best checkpoint. Without any model yet, scoring runs
in cold-start mode (appearance features, no uncertainty).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from srpu_pipelines.config import Params
from srpu_pipelines.errors import InputError
from srpu_pipelines.io.files import sha256_file_cached
from srpu_pipelines.pipeline.steps import CHAMPION, final_dir
from srpu_pipelines.resources.tracking import Tracker

log = logging.getLogger(__name__)


def scoring_model(params: Params, tracker: Tracker | None) -> tuple[Path | None, str]:
    """(checkpoint, model key) of the model that scores the pool; (None, COLD_KEY) when
    there is no model yet (or ``active.cold_start: always``)."""
    from srpu_pipelines.active_learning.scoring import COLD_KEY

    a = params.active
    if a.cold_start == "always":
        return None, COLD_KEY
    ckpt: Path | None = None
    key = ""
    if tracker is not None:
        mv = tracker.get_alias(CHAMPION)
        if mv is not None:
            ckpt = tracker.fetch_checkpoint(CHAMPION, Path(params.predict.models_cache))
            key = f"{tracker.registered_model}/v{mv.version}"
    else:
        best = final_dir(params) / "best.pt"
        if best.is_file():
            ckpt, key = best, "checkpoint"
    if ckpt is None:
        if a.cold_start == "never":
            raise InputError(
                "active.cold_start: never, but there is no champion model to score with: "
                "train and promote one first (srpu train, srpu promote)"
            )
        return None, COLD_KEY
    return ckpt, f"{key}:{sha256_file_cached(ckpt)[:12]}"


def run_score(
    params: Params,
    tracker: Tracker | None,
    progress: bool = True,
    datasets: set[str] | None = None,
) -> dict[str, Any]:
    """Score the pool (or the sub-datasets ``datasets`` of it: one part of the fan-out);
    only images whose stored scores are stale are recomputed."""
    import torch

    from srpu_pipelines.active_learning.scoring import score_pool
    from srpu_pipelines.data.index import load_index

    if params.active.scoring_threads:
        torch.set_num_threads(params.active.scoring_threads)
    ckpt, key = scoring_model(params, tracker)
    index = load_index(params.data.index_path)
    out = score_pool(params, index, ckpt, key, progress=progress, datasets=datasets)
    log.info("scored %d pool images, kept %d (model %s)", out["computed"], out["kept"], key)
    return out


def _predictor(params: Params, checkpoint: Path):
    """item -> (labels (h, w), entropy (h, w)) of its image or tile; one image cached."""
    from srpu_pipelines.active_learning.scoring import ensemble_probs
    from srpu_pipelines.active_learning.uncertainty import entropy_map
    from srpu_pipelines.analysis.evaluate import load_checked
    from srpu_pipelines.analysis.inference import input_scale
    from srpu_pipelines.data.dataset import read_sample, standardize
    from srpu_pipelines.data.masks import with_bar

    model, cfg = load_checked(params, checkpoint)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def predict(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if item["image_id"] not in cache:
            cache.clear()
            bar = int(item.get("data_bar_rows") or 0)
            img = standardize(read_sample(item["image"], bar))  # the sample only
            scale = input_scale(cfg, item.get("pixel_size_nm"))  # the model's pixels
            probs, _ = ensemble_probs(model, img, params, cfg["in_channels"], scale)
            h = img.shape[0] + bar
            labels = with_bar(probs.argmax(0).astype(np.uint8), h, bar)  # bar: not sample
            unc = entropy_map(probs)
            unc = np.vstack([unc, np.zeros((bar, unc.shape[1]), unc.dtype)])  # bar: certain
            cache[item["image_id"]] = (labels, unc)
        labels, unc = cache[item["image_id"]]
        if item["box"] is None:
            return labels, unc
        y, x, h, w = item["box"]
        return labels[y : y + h, x : x + w], unc[y : y + h, x : x + w]

    return predict


def run_select(params: Params, tracker: Tracker | None) -> dict[str, Any]:
    """Select the next batch over the stored scores and write its round folder. With the
    same model and labelled data as the latest round, that round is returned unchanged."""
    from srpu_pipelines.active_learning.rounds import (
        awaiting_ids,
        labeled_revision,
        load_summary,
        open_round,
        round_folders,
        write_round,
    )
    from srpu_pipelines.active_learning.selection import (
        candidates,
        is_cold,
        label_state,
        select,
    )
    from srpu_pipelines.data.index import load_index

    index = load_index(params.data.index_path)
    ckpt, key = scoring_model(params, tracker)
    revision = labeled_revision(index)
    existing = open_round(params, key, revision)
    if existing is not None:
        n, folder = existing
        return {"round": n, "folder": folder, "summary": load_summary(folder), "new": False}
    awaiting = awaiting_ids(params, index)
    cands, unscored, centres = candidates(params, index, key, awaiting)
    if unscored:
        raise InputError(
            f"{len(unscored)} image(s) have no scores from model {key} "
            f"(e.g. {unscored[:3]}): run `srpu score` (or materialize uncertainty_scores) first"
        )
    if not cands:
        raise InputError(
            "nothing left to select: every pool image is labelled or awaiting correction "
            f"({len(awaiting)} awaiting)"
        )
    cold = is_cold(params, key)
    rounds = round_folders(params)
    number = rounds[-1][0] + 1 if rounds else 1
    state = label_state(index, len(params.classes))
    chosen = select(
        params, cands, cold, seed=params.seed * 1000 + number, centres=centres, state=state
    )
    pool = {it["id"]: it for it in index.get("pool", [])}
    for c in chosen:  # what the round's files need to know of their parent image
        parent = pool.get(c["image_id"], {})
        c["data_bar_rows"] = int(parent.get("data_bar_rows") or 0)
        c["pixel_size_nm"] = parent.get("pixel_size_nm")
    predict = _predictor(params, ckpt) if ckpt is not None else (lambda item: None)
    n, folder, summary = write_round(params, chosen, predict, key, revision, cold)
    log.info("round %d: %d items selected into %s", n, len(chosen), folder)
    return {"round": n, "folder": folder, "summary": summary, "new": True}


def run_record_round(
    params: Params, tracker: Tracker | None, selected_round: int
) -> dict[str, Any]:
    """Append this round to the history (and log it as an MLflow run): what came back
    labelled since the last entry, the correction effort, the champion's validation mIoU
    before and after, the test mIoU of the new model and the batch selected next.
    Recording the same state twice appends nothing."""
    import datetime

    from srpu_pipelines.active_learning.history import (
        append_history,
        next_round,
        read_history,
        stop_reason,
    )
    from srpu_pipelines.active_learning.rounds import (
        correction_effort,
        labeled_revision,
        load_summary,
        round_folders,
    )
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.io.files import read_json

    history = read_history(params)
    index = load_index(params.data.index_path)
    revision = labeled_revision(index)
    if history and (history[-1]["labeled_revision"], history[-1]["selected_round"]) == (
        revision,
        selected_round,
    ):
        return {"entry": history[-1], "new": False, "stop": stop_reason(params, history)}
    ids = sorted(it["id"] for it in index["items"])
    corrected = sorted(set(ids) - set(history[-1]["labeled_ids"])) if history else []
    effort = [e for e in correction_effort(params, index) if e["id"] in corrected]
    ev = Path(params.evaluate.out_dir)
    promo = read_json(ev / "promotion.json") if (ev / "promotion.json").is_file() else {}
    test = read_json(ev / "metrics.json") if (ev / "metrics.json").is_file() else {}
    before = promo.get("champion_val_miou")
    after = promo.get("candidate_val_miou") if promo.get("passed") else before
    folders = dict(round_folders(params))
    selected = [s["id"] for s in load_summary(folders[selected_round])["selected"]]
    entry = {
        "round": next_round(history),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "labeled_revision": revision,
        "labeled_count": len(ids),
        "labeled_ids": ids,
        "corrected": corrected,
        "correction_effort": effort,
        "mean_correction_dice": (float(np.mean([e["dice"] for e in effort])) if effort else None),
        "candidate_version": promo.get("candidate_version"),
        "promoted": promo.get("passed"),
        "val_miou_before": before,
        "val_miou_after": after,
        "test_miou": test.get("miou"),
        # per sub-dataset, on the same fixed images every round (ids below)
        "test_miou_per_dataset": {
            ds: sc.get("miou") for ds, sc in test.get("per_dataset", {}).items()
        },
        "test_split": test.get("split"),
        "test_ids": sorted(e["id"] for e in test.get("per_image", [])),
        "val_ids": sorted(it["id"] for it in index["items"] if it["split"] == "val"),
        "selected_round": selected_round,
        "selected": selected,
    }
    if tracker is not None:  # first: a failure here leaves no history line to skip it
        metrics = {
            k: float(entry[k])
            for k in (
                "labeled_count",
                "mean_correction_dice",
                "val_miou_before",
                "val_miou_after",
                "test_miou",
            )
            if entry[k] is not None
        }
        metrics.update(
            {
                f"test_miou.{ds}": float(v)
                for ds, v in entry["test_miou_per_dataset"].items()
                if v is not None
            }
        )
        with tracker.start_run(
            f"active_learning_round_{entry['round']}",
            {"active": params.active.model_dump(mode="json"), "corrected": corrected},
            {"srpu.stage": "active_learning_round", "srpu.round": str(entry["round"])},
        ):
            tracker.log_metrics(metrics, step=entry["round"])
            tracker.log_artifact(
                folders[selected_round] / "selection_summary.json", "active_learning"
            )
    append_history(params, entry)
    history.append(entry)
    return {"entry": entry, "new": True, "stop": stop_reason(params, history)}
