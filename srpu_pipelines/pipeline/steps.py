"""Pipeline steps shared by the two doors, Dagster assets and the CLI (and so `dvc repro`).

Each step reads params, calls one core function and records the result with a
:class:`~srpu_pipelines.resources.tracking.Tracker`. Steps hand over through files at
the paths in params (the index JSON, checkpoints, metrics JSON), so a step run from the
CLI and the same step run from Dagster produce and read the same things.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from srpu_pipelines.compute.distributed import is_main_process
from srpu_pipelines.config import Params
from srpu_pipelines.errors import InputError, MissingError, NotFoundError
from srpu_pipelines.io.faults import fault_point
from srpu_pipelines.io.files import atomic_write_json, read_json, sha256_file
from srpu_pipelines.resources.tracking import ModelVersion, Tracker, flat_metrics

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"


def data_revision(index_path: str | Path) -> str:
    """Content hash of the index JSON: it names every file by its own hash."""
    return hashlib.sha256(Path(index_path).read_bytes()).hexdigest()[:16]


def stage_params(params: Params, name: str) -> Params:
    """``params`` with ``train`` replaced by stage ``name``'s merged training settings."""
    from srpu_pipelines.config import stage_train

    st = params.stage(name)
    return params.model_copy(update={"train": stage_train(params, st)})


def stage_dir(params: Params, name: str) -> Path:
    return Path(stage_params(params, name).train.out_dir)


def stage_asset_name(stage: str) -> str:
    """Dagster asset key and DVC stage name of training stage ``stage``."""
    return f"train_{stage}"


def uses_mae(params: Params) -> bool:
    """Does a stage start from the MAE encoder (so the pipeline has an mae_encoder step)?"""
    return any(s.init_kind == "mae" for s in params.stages)


def final_stage(params: Params) -> str:
    """The last training stage: its best checkpoint is the model that is evaluated,
    registered and promoted."""
    return params.stages[-1].name


def final_dir(params: Params) -> Path:
    return stage_dir(params, final_stage(params))


def final_val_split(params: Params) -> str:
    return stage_params(params, final_stage(params)).train.val_split


def model_record_path(params: Params, stage: str | None = None) -> Path:
    return stage_dir(params, stage or final_stage(params)) / "model_version.json"


def mae_record_path(params: Params) -> Path:
    return Path(params.pretrain.out_dir) / "mae_run.json"


def run_index(params: Params, progress: bool = True) -> dict[str, Any]:
    from srpu_pipelines.data.index import build_index, write_index, write_split_record

    idx = build_index(params, show_progress=progress)
    if params.data.split.record is not None:  # first: the versioned record never lags
        write_split_record(idx, params.data.split.record)
    changed = write_index(idx, params.data.index_path)
    return {"index": idx, "changed": changed, "revision": data_revision(params.data.index_path)}


def run_pretrain(params: Params, tracker: Tracker | None, progress: bool = True) -> dict[str, Any]:
    """MAE pretraining of the encoder inside a tracked run (loss per epoch, the encoder
    checkpoint and the reconstruction pictures). Re-running with nothing changed trains
    nothing and starts no run. Budgets: ``pretrain.max_steps`` / ``pretrain.budget_s``."""
    from srpu_pipelines.config import pretrain_setup
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.training.loop import run_task, task_is_finished
    from srpu_pipelines.training.pretrain import MaeTask

    task = MaeTask(pretrain_setup(params), load_index(params.data.index_path))
    rec_path = mae_record_path(params)
    enc = Path(params.pretrain.out_dir) / "encoder.pt"
    if not is_main_process():  # a data-parallel worker: rank 0 tracks and records
        return {"result": run_task(task, progress=False), "record": None}
    if tracker is None:
        rec_path.unlink(missing_ok=True)
        return {"result": run_task(task, progress=progress), "record": None}
    if rec_path.is_file() and task_is_finished(task):
        record = read_json(rec_path)
        if record.get("encoder_sha256") == sha256_file(enc):
            return {"result": run_task(task, progress=progress), "record": record}  # at once
    rec_path.unlink(missing_ok=True)
    tags = {
        "srpu.stage": "mae_encoder",
        "srpu.data_revision": data_revision(params.data.index_path),
    }
    with tracker.start_run("mae_encoder", params.resolved(), tags) as run_id:

        def log_epoch(rec: dict[str, Any]) -> None:
            tracker.log_metrics({"mae_loss": rec["loss"], "lr": rec["lr"]}, step=rec["epoch"])

        res = run_task(task, callbacks=[log_epoch], progress=progress)
        for f in (res.encoder_checkpoint, res.encoder_checkpoint.with_suffix(".json")):
            tracker.log_artifact(f, "encoder")
        tracker.log_artifact(res.out_dir / "pretrain_metrics.json")
        if res.reconstructions.is_file():
            tracker.log_artifact(res.reconstructions, "pictures")
    record = {"run_id": run_id, "encoder_sha256": sha256_file(enc), "method": res.method}
    atomic_write_json(rec_path, record)
    return {"result": res, "record": record}


def resolve_init(
    params: Params, name: str, tracker: Tracker | None
) -> tuple[Path | None, str | None]:
    """Start weights of stage ``name`` and how strictly they must fit:
    (None, None) for random init (or ``model.weights``), else (file, "encoder"|"model"|None)."""
    st = params.stage(name)
    kind, arg = st.init_kind, st.init_arg
    if kind == "random":
        return None, None
    if kind == "mae":
        enc = Path(params.pretrain.out_dir) / "encoder.pt"
        if not enc.is_file():
            raise MissingError(
                f"stage {name!r} starts from the MAE encoder, but {enc} does not exist: "
                "run `srpu pretrain` (or materialize mae_encoder) first"
            )
        return enc, "encoder"
    if kind == "previous":
        names = [s.name for s in params.stages]
        prev = names[names.index(name) - 1]
        ckpt = stage_dir(params, prev) / "best.pt"
        if not ckpt.is_file():
            raise MissingError(
                f"stage {name!r} starts from stage {prev!r}, but {ckpt} does not exist: "
                f"run `srpu train --stage {prev}` first"
            )
        return ckpt, "model"
    if kind == "alias":
        if tracker is None:
            raise InputError(
                f"stage {name!r}: init {st.init!r} needs the model registry "
                "(tracking.enabled: true)"
            )
        return tracker.fetch_checkpoint(arg, Path(params.predict.models_cache)), "model"
    path = Path(arg)
    if not path.is_file():
        raise MissingError(f"stage {name!r}: init file {path} not found")
    return path, None


def run_train(
    params: Params, tracker: Tracker | None, progress: bool = True, stage: str | None = None
) -> dict[str, Any]:
    """Train every stage in order (or only ``stage``); returns the last one's outcome."""
    names = [stage] if stage else [s.name for s in params.stages]
    out: dict[str, Any] = {}
    for name in names:
        out = run_stage(params, tracker, name, progress=progress)
    return out


def stage_task(params: Params, name: str, tracker: Tracker | None):
    """The loop task of stage ``name``: its sections of params, the index, its start."""
    from srpu_pipelines.config import stage_setup
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.training.trainer import StageTask

    init, require = resolve_init(params, name, tracker)
    # with a registry every finished model is kept there, so a changed stage may start
    # over in its folder; a data-parallel worker (no tracker of its own) does as rank 0
    restart = tracker is not None or (not is_main_process() and params.tracking.enabled)
    return StageTask(
        stage_setup(params, name),
        load_index(params.data.index_path),
        init_weights=init,
        init_require=require,
        restart_on_change=restart,
    )


def _log_epoch(tracker: Tracker):
    def log_epoch(rec: dict[str, Any]) -> None:
        m = {"train_loss": rec["train_loss"], "lr": rec["lr"]}
        for k in ("unlabeled_loss", "confident_share"):
            if k in rec:
                m[k] = rec[k]
        if "val_miou" in rec:
            m.update(flat_metrics("val_", {"miou": rec["val_miou"], "iou": rec["val_iou"]}))
        tracker.log_metrics(m, step=rec["epoch"])

    return log_epoch


def run_stage(
    params: Params,
    tracker: Tracker | None,
    name: str,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train stage ``name`` inside a tracked run of its own. The final stage's best
    checkpoint is registered as ``challenger``; earlier stages hand over by file.

    Re-running with nothing changed (settings, data, start weights) trains nothing and
    starts no run: the finished run's record is returned. Changed inputs start the stage
    over (its earlier run stays in MLflow). The record (``model_version.json`` in the
    stage folder) names the run, the registered version (final stage only) and the
    checkpoint's hash, so later steps log only about the checkpoint it describes.
    In a data-parallel run only rank 0 tracks, registers and writes the record.
    """
    from srpu_pipelines.training.loop import run_task, task_is_finished

    main = is_main_process()
    task = stage_task(params, name, tracker)
    sp = stage_params(params, name)
    record_path = model_record_path(params, name)
    if not main or tracker is None:
        if main:
            record_path.unlink(missing_ok=True)  # it would describe a checkpoint to change
        res = run_task(task, callbacks=callbacks, progress=progress and main)
        return {"result": res, "version": None, "record": None, "stage": name, "plan": task.plan}
    if record_path.is_file() and task_is_finished(task):
        record = read_json(record_path)
        if record.get("checkpoint_sha256") == sha256_file(task.out / "best.pt"):
            res = run_task(task, progress=progress)  # returns at once
            mv = None
            if record.get("version") is not None:
                mv = ModelVersion(
                    record["version"], record["run_id"], {"val_miou": str(record["val_miou"])}
                )
            return {
                "result": res,
                "version": mv,
                "record": record,
                "stage": name,
                "plan": task.plan,
            }
    record_path.unlink(missing_ok=True)
    rev = data_revision(params.data.index_path)
    tags = {"srpu.stage": name, "srpu.data_revision": rev, "srpu.init": params.stage(name).init}
    logged = {**sp.resolved(), "stage": name}
    if task.plan is not None:  # the values the plan chose for the ``auto`` keys
        logged.update({f"plan.{k}": v for k, v in task.plan.values.items()})
    with tracker.start_run(f"train_{name}", logged, tags) as run_id:
        res = run_task(task, callbacks=[_log_epoch(tracker), *(callbacks or [])], progress=progress)
        if task.plan is not None:
            tracker.log_artifact(res.out_dir / "plan.json")
        for f in (res.best_checkpoint, res.best_checkpoint.with_suffix(".json")):
            tracker.log_artifact(f, "checkpoint")
        tracker.log_artifact(res.out_dir / "train_metrics.json")
        mv = None
        if name == final_stage(params):
            from srpu_pipelines.data.index import load_index
            from srpu_pipelines.pipeline.lineage import lineage_tags

            meta = {"data_revision": rev, "val_split": sp.train.val_split, "stage": name}
            meta.update(lineage_tags(sp, load_index(params.data.index_path), rev, sp.resolved()))
            mv = tracker.log_model(res.best_checkpoint, {"val_miou": str(res.best_miou), **meta})
            fault_point("registry:alias")
            tracker.set_alias(CHALLENGER, mv.version)
    record = {
        "run_id": run_id,
        "stage": name,
        "version": mv.version if mv else None,
        "val_miou": res.best_miou,
        "data_revision": rev,
        "registered_model": tracker.registered_model,
        "checkpoint_sha256": sha256_file(res.best_checkpoint),
    }
    atomic_write_json(record_path, record)
    keep = params.tracking.keep_run_checkpoints
    if keep is not None:  # retention: older runs' checkpoints (registered ones stay)
        tracker.prune_checkpoints(name, keep)
    return {"result": res, "version": mv, "record": record, "stage": name, "plan": task.plan}


def run_evaluate(
    params: Params,
    tracker: Tracker | None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a checkpoint on ``evaluate.split``. When it is the registered one (same hash
    as the training record), the scores and overlays go into its training run."""
    from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
    from srpu_pipelines.data.index import load_index

    ckpt = Path(checkpoint or final_dir(params) / f"{params.evaluate.checkpoint}.pt")
    metrics = evaluate_checkpoint(
        params, load_index(params.data.index_path), ckpt, progress=progress
    )
    rec_path = model_record_path(params)
    if tracker is None or not rec_path.is_file():
        return metrics
    rec = read_json(rec_path)
    if rec.get("checkpoint_sha256") != sha256_file(ckpt):
        log.info("%s is not the registered checkpoint: scores not logged to MLflow", ckpt)
        return metrics
    with tracker.start_run("evaluate", {}, {"srpu.evaluated": "true"}, run_id=rec["run_id"]):
        tracker.log_metrics(flat_metrics(f"eval_{metrics['split']}_", metrics))
        out = Path(params.evaluate.out_dir)
        tracker.log_artifact(out / "metrics.json", "evaluation")
        for png in metrics["overlay_files"]:
            tracker.log_artifact(png, "evaluation/overlays")
    return metrics


def _score_on_current_val(params: Params, tracker: Tracker) -> float:
    """The champion's mIoU on this index's validation split (its tag was measured on
    other data)."""
    import tempfile

    from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
    from srpu_pipelines.data.index import load_index

    ckpt = tracker.fetch_checkpoint(CHAMPION, Path(params.predict.models_cache))
    with tempfile.TemporaryDirectory(prefix="srpu-gate-") as tmp:
        p = params.model_copy(deep=True)
        p.evaluate.overlays = 0
        m = evaluate_checkpoint(
            p,
            load_index(params.data.index_path),
            ckpt,
            split=final_val_split(params),
            out_dir=tmp,
            progress=False,
        )
    return float(m["miou"])


def champion_gate(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Is the newly trained model at least as good on validation as the champion?

    Both are compared on the same validation images: when the champion was scored on
    another data revision or split, it is re-scored on the current one first.
    """
    rec = read_json(model_record_path(params))
    champ = tracker.get_alias(CHAMPION)
    new = rec.get("val_miou")
    out: dict[str, Any] = {
        "candidate_version": rec["version"],
        "candidate_val_miou": new,
        "champion_version": champ.version if champ else None,
        "champion_val_miou": champ.val_miou if champ else None,
        "reason": "",
    }
    if champ is None:
        return {**out, "passed": True, "reason": "no champion yet"}
    if champ.version == rec["version"]:
        return {**out, "passed": True, "reason": "already champion"}
    if new is None or new != new:
        return {
            **out,
            "passed": False,
            "reason": "the new model has no validation score (no images in the "
            "train.val_split split): nothing to compare with",
        }
    same_data = champ.tags.get("data_revision") == rec["data_revision"] and champ.tags.get(
        "val_split", final_val_split(params)
    ) == final_val_split(params)
    if not same_data or out["champion_val_miou"] is None:
        out["champion_val_miou"] = _score_on_current_val(params, tracker)
        out["reason"] = "champion re-scored on the current validation split"
    out["passed"] = float(new) >= out["champion_val_miou"]
    return out


def run_promote(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Gate, then give the new version the ``champion`` alias when it passes; the decision
    is written to ``evaluate.out_dir/promotion.json``."""
    gate = champion_gate(params, tracker)
    if gate["passed"]:
        fault_point("promote:alias")
        tracker.set_alias(CHAMPION, gate["candidate_version"])
    atomic_write_json(Path(params.evaluate.out_dir) / "promotion.json", gate)
    return gate


def run_rollback(params: Params, tracker: Tracker, version: str, reason: str = "") -> dict:
    """A person's decision: give registered ``version`` the ``champion`` alias (no gate:
    the person compared), and record it as a line of the round history (``event``:
    rollback, the champion before and after), so the loop's record shows who changed the
    champion and when. The history's labelled state is carried over: a rollback changes
    the model, not the labels."""
    import datetime

    from srpu_pipelines.active_learning.history import append_history, next_round, read_history

    mv = tracker.get_version(version)
    if mv is None:
        raise NotFoundError(
            f"{tracker.registered_model} has no version {version}: the MLflow registry "
            "(make mlflow-ui) lists the versions"
        )
    before = tracker.get_alias(CHAMPION)
    history = read_history(params)
    last = history[-1] if history else {}
    entry = {
        "round": next_round(history),
        "event": "rollback",
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "champion_before": before.version if before else None,
        "champion_after": mv.version,
        "reason": reason,
        "corrected": [],
        **{k: last[k] for k in ("labeled_revision", "labeled_ids", "selected_round") if k in last},
    }
    tracker.set_alias(CHAMPION, mv.version)
    append_history(params, entry)  # after the alias: a line never claims what did not happen
    return entry


def prediction_checkpoint(params: Params, tracker: Tracker | None) -> Path:
    """The checkpoint ``predict.source`` names: the champion's, or the final stage's."""
    if params.predict.source == "checkpoint":
        return final_dir(params) / f"{params.evaluate.checkpoint}.pt"
    if tracker is None:
        raise InputError(
            "predict.source: champion needs tracking.enabled: true (the registry); "
            "or set predict.source: checkpoint"
        )
    try:
        return tracker.fetch_checkpoint(CHAMPION, Path(params.predict.models_cache))
    except LookupError as e:
        raise InputError(
            f"predict.source: champion: {e}; promote a model first "
            "(srpu promote) or set predict.source: checkpoint"
        ) from None


def run_quantify(
    params: Params,
    tracker: Tracker | None,
    progress: bool = True,
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``srpu quantify``: measure the masks ``quantify.source`` names and write the tables
    and plots to ``quantify.out_dir``; the headline numbers go to MLflow (a run of its own,
    tagged with the index's data revision)."""
    from tqdm import tqdm

    from srpu_pipelines.analysis import quantify as q
    from srpu_pipelines.data.index import load_index, select_items
    from srpu_pipelines.data.masks import MaskCodec

    qp = params.quantify
    if qp.source == "labels":
        index = load_index(params.data.index_path)
        items = select_items(index, qp.splits)
        if not items:
            raise InputError(f"quantify.splits {qp.splits}: no labelled images there")
        source, total = q.from_labels(items, MaskCodec.from_params(params)), len(items)
    else:
        source, total = q.from_predictions(Path(params.predict.out_dir)), None
    bar = tqdm(total=total, desc="quantify", unit="img", disable=not progress)
    try:
        doc = q.quantify(
            source,
            params.class_names,
            [tuple(c.color) for c in params.classes],
            qp,
            Path(qp.out_dir),
            on_image=lambda n: (bar.update(1), on_image and on_image(n)),
        )
    finally:
        bar.close()
    if tracker is not None:
        tags = {"srpu.step": "quantify", "srpu.quantify.source": qp.source}
        if qp.source == "labels":
            tags["srpu.data_revision"] = data_revision(params.data.index_path)
        settings = {f"quantify.{k}": v for k, v in qp.model_dump(mode="json").items()}
        with tracker.start_run("quantify", settings, tags):
            tracker.log_metrics(q.flat_metrics(doc))
            out = Path(qp.out_dir)
            for f in ["quantify.json", "per_image.csv", "particles.csv", *doc["plots"]]:
                tracker.log_artifact(out / f, "quantify")
    return doc
