"""Training assets: one per stage in params.yaml ``stages``, each an MLflow run; the last
stage's best checkpoint is registered as 'challenger'."""

import dagster as dg
from pydantic import Field

from srpu_pipelines.assets._metadata import curve_png, image_preview
from srpu_pipelines.config import Params, load_params
from srpu_pipelines.pipeline.launch import launch_train
from srpu_pipelines.pipeline.steps import CHAMPION, run_stage, stage_asset_name
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource
from srpu_pipelines.training.plan import plan_markdown


class StageRunConfig(dg.Config):
    """Run-time options of a training stage asset. (This module has no ``from __future__
    import annotations``: Dagster reads the config class from the real annotation.)"""

    warm_start: bool = Field(
        default=False,
        description="start from the registry's champion instead of the stage's init "
        "(what an active-learning round does); the normal init when there is no champion",
    )
    nproc: int = Field(
        default=1,
        ge=1,
        description="data-parallel processes on this machine (torchrun: gloo on CPUs, NCCL "
        "on GPUs); train.batch_size stays the global batch",
    )


def _epoch_events(context: dg.AssetExecutionContext):
    """Per-epoch progress while a stage trains: a log line and an asset observation (loss,
    val mIoU, steps/s, ETA), which the Dagster UI shows as the run goes."""

    def on_epoch(rec: dict) -> None:
        val = f", val mIoU {rec['val_miou']:.4f}" if "val_miou" in rec else ""
        context.log.info(
            f"epoch {rec['epoch']}: step {rec['step']}/{rec['total_steps']}, loss "
            f"{rec['loss']:.4f}{val}, {rec['steps_per_s']:.2f} steps/s, ETA {rec['eta_s']:.0f} s"
        )
        meta = {
            k: float(rec[k])
            for k in ("loss", "val_miou", "steps_per_s", "eta_s", "lr")
            if k in rec and rec[k] == rec[k]
        }
        meta.update(
            epoch=int(rec["epoch"]), step=int(rec["step"]), total_steps=int(rec["total_steps"])
        )
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata=meta))

    return on_epoch


def _stage_asset(params: Params, i: int) -> dg.AssetsDefinition:
    st = params.stages[i]
    deps = ["dataset_index"]
    if st.init_kind == "mae":
        deps.append("mae_encoder")
    if st.init_kind == "previous":
        deps.append(stage_asset_name(params.stages[i - 1].name))
    final = i == len(params.stages) - 1
    what = "registered as 'challenger'" if final else "handed to the next stage"
    name = st.name

    @dg.asset(
        name=stage_asset_name(name),
        group_name="training",
        deps=deps,
        description=f"Training stage {name!r} (srpu train --stage {name}), starting from "
        f"{st.init}; best checkpoint {what}.",
    )
    def _train(
        context: dg.AssetExecutionContext,
        config: StageRunConfig,
        params: ParamsResource,
        mlflow: MlflowResource,
    ) -> dg.MaterializeResult:
        overrides = list(params.overrides)
        p = params.load()
        tracker = mlflow.tracker(p)
        if config.warm_start and tracker is not None and tracker.get_alias(CHAMPION):
            overrides.append(f"stages.{i}.init=alias:{CHAMPION}")
            p = load_params(params.path, overrides)
            context.log.info("warm start: stage %s starts from the champion", name)
        if config.nproc > 1:
            rc = launch_train(p, params.path, overrides, tracker, config.nproc, name, quiet=True)
            if rc != 0:
                raise RuntimeError(
                    f"stage {name}: torchrun with {config.nproc} processes exited {rc}"
                )
            context.log.info("stage %s trained in %d processes", name, config.nproc)
        # after a data-parallel run this finds the stage done and returns its record
        out = run_stage(p, tracker, name, progress=False, callbacks=[_epoch_events(context)])
        res = out["result"]
        last = res.history[-1] if res.history else {}
        meta = {
            "stage": name,
            "init": p.stage(name).init,  # alias:champion on a warm start
            "best_val_miou": res.best_miou,
            "best_epoch": res.best_epoch,
            "steps": res.steps,
            "train_seconds": round(res.train_seconds, 1),
            "checkpoint": dg.MetadataValue.path(str(res.best_checkpoint)),
        }
        if last.get("val_iou"):
            rows = ["| class | val IoU (last epoch) |", "| --- | ---: |"]
            rows += [f"| {k} | {v:.4f} |" for k, v in last["val_iou"].items()]
            meta["val_iou"] = dg.MetadataValue.md("\n".join(rows))
        if out["plan"] is not None:
            meta["plan"] = dg.MetadataValue.md(plan_markdown(out["plan"]))
        if "confident_share" in last:
            meta["confident_share"] = last["confident_share"]
        if res.history:
            meta["curve"] = image_preview(curve_png(res.history, "train_loss", "train loss"))
        if out["record"] is not None:
            meta["mlflow_run_id"] = out["record"]["run_id"]
        if out["version"] is not None:
            meta["model_version"] = out["version"].version
        return dg.MaterializeResult(metadata=meta)

    return _train


def stage_assets(params: Params) -> list[dg.AssetsDefinition]:
    """One asset per training stage, each depending on what it starts from."""
    return [_stage_asset(params, i) for i in range(len(params.stages))]
