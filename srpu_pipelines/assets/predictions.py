"""Inference asset: the champion model applied to the inference folder."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from srpu_pipelines.analysis.evaluate import predict_folder
from srpu_pipelines.assets._metadata import image_preview
from srpu_pipelines.assets.evaluation import champion_model
from srpu_pipelines.pipeline.steps import prediction_checkpoint
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource


@dg.asset(
    group_name="inference",
    deps=[champion_model],
    description="Colour, indexed-PNG and palette-TIFF masks and an overlay for every image "
    "in predict.input_dir, made by the champion model (srpu predict); the data bar is "
    "'not sample'.",
)
def predictions(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    p = params.load()
    ckpt = prediction_checkpoint(p, mlflow.tracker(p))
    res = predict_folder(p, ckpt, progress=False)
    meta = {
        "images": len(res["predicted"]),
        "skipped": len(res["skipped"]),
        "model": str(ckpt),
        "out_dir": dg.MetadataValue.path(str(p.predict.out_dir)),
    }
    if res["predicted"]:
        first = Path(res["predicted"][0]["image"])
        meta["preview"] = image_preview(Path(p.predict.out_dir) / f"{first.stem}_overlay.png")
        meta["data_bar_rows"] = res["predicted"][0]["data_bar_rows"]
    return dg.MaterializeResult(metadata=meta)
