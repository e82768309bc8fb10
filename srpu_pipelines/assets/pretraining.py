"""Pretraining asset: the MAE encoder, tracked in MLflow, with reconstruction pictures."""

from __future__ import annotations

import dagster as dg

from srpu_pipelines.assets._metadata import curve_png, image_preview
from srpu_pipelines.assets.data import dataset_index
from srpu_pipelines.pipeline.steps import run_pretrain
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource


@dg.asset(
    group_name="training",
    deps=[dataset_index],
    description="Encoder pretrained by masked-image modelling on the unlabelled pool and the "
    "labelled images' pixels (srpu pretrain); loads 1:1 into the segmentation model.",
)
def mae_encoder(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    p = params.load()
    out = run_pretrain(p, mlflow.tracker(p), progress=False)
    res = out["result"]
    meta = {
        "method": res.method,
        "images": res.images,
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "mask_ratio": p.pretrain.mask_ratio,
        "patch_size": p.pretrain.patch_size,
        "final_loss": res.history[-1]["loss"] if res.history else None,
        "checkpoint": dg.MetadataValue.path(str(res.encoder_checkpoint)),
    }
    if res.history:
        meta["curve"] = image_preview(curve_png(res.history, "loss", "MAE loss"))
    if res.reconstructions.is_file():
        meta["reconstructions"] = image_preview(res.reconstructions)
    if out["record"] is not None:
        meta["mlflow_run_id"] = out["record"]["run_id"]
    return dg.MaterializeResult(metadata=meta)
