"""The one Dagster ``Definitions`` of SRPU (loaded by workspace.yaml and [tool.dagster])."""

from __future__ import annotations

import os

import dagster as dg

from srpu_pipelines.assets.data import dataset_index, masks_decode_and_fit, splits_hold_every_class
from srpu_pipelines.assets.evaluation import champion_model, evaluation, not_worse_than_champion
from srpu_pipelines.assets.predictions import predictions
from srpu_pipelines.assets.training import trained_model
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ASSETS = [dataset_index, trained_model, evaluation, champion_model, predictions]
CHECKS = [masks_decode_and_fit, splits_hold_every_class, not_worse_than_champion]

# Object selections, not strings: string selections go through Dagster's ANTLR parser.
pipeline_job = dg.define_asset_job(
    "srpu_pipeline",
    selection=dg.AssetSelection.all(),
    description="index -> train -> evaluate -> (gate) -> promote -> predict",
)

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=[pipeline_job],
    resources={"params": ParamsResource(), "mlflow": MlflowResource()},
    # 2 cores: the multiprocess executor costs more than the work (STACK_NOTES)
    executor=dg.in_process_executor,
)
