"""The one Dagster ``Definitions`` of SRPU (loaded by workspace.yaml and [tool.dagster]).

Training stages come from params.yaml (``stages``): one asset per stage, built when the
code location loads. The params file is ``$SRPU_PARAMS`` or ``params.yaml`` in the working
directory; after editing its stage list, reload the code location (the UI's "Reload").
"""

from __future__ import annotations

import os

import dagster as dg

from srpu_pipelines.assets.active_learning import (
    round_history,
    scoring_assets,
    selected_batch,
)
from srpu_pipelines.assets.data import (
    dataset_index,
    labeled_data,
    masks_decode_and_fit,
    splits_hold_every_class,
)
from srpu_pipelines.assets.evaluation import (
    champion_model,
    evaluation_asset,
    not_worse_than_champion,
)
from srpu_pipelines.assets.microstructure import microstructure_asset
from srpu_pipelines.assets.predictions import predictions
from srpu_pipelines.assets.pretraining import mae_encoder
from srpu_pipelines.assets.training import stage_assets
from srpu_pipelines.config import Params, load_params
from srpu_pipelines.pipeline.steps import stage_asset_name, uses_mae
from srpu_pipelines.resources.dagster_resources import (
    DvcResource,
    MlflowResource,
    ParamsResource,
    params_path,
)
from srpu_pipelines.sensors.new_masks import new_masks_sensor, round_job

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CHECKS = [masks_decode_and_fit, splits_hold_every_class, not_worse_than_champion]


def pipeline_assets(params: Params) -> list[dg.AssetsDefinition]:
    """Every asset for ``params``: index, the MAE encoder (when a stage starts from it),
    one per training stage, evaluation, champion, predictions, microstructure, the pool's
    uncertainty scores, the next batch to label and the round history."""
    final = stage_asset_name(params.stages[-1].name)
    return [
        dataset_index,
        labeled_data,
        *([mae_encoder] if uses_mae(params) else []),
        *stage_assets(params),
        evaluation_asset(final),
        champion_model,
        predictions,
        microstructure_asset(params),
        *scoring_assets(params),
        selected_batch,
        round_history,
    ]


def build_definitions(params: Params) -> dg.Definitions:
    # Object selections, not strings: string selections go through Dagster's ANTLR parser.
    job = dg.define_asset_job(
        "srpu_pipeline",
        selection=dg.AssetSelection.all(),
        description="index -> MAE encoder -> training stages -> evaluate -> (gate) -> "
        "promote -> predict, score the pool -> select the next batch -> record the round",
    )
    return dg.Definitions(
        assets=pipeline_assets(params),
        asset_checks=CHECKS,
        jobs=[job, round_job(params)],
        sensors=[new_masks_sensor],
        resources={"params": ParamsResource(), "mlflow": MlflowResource(), "dvc": DvcResource()},
        # 2 cores: the multiprocess executor costs more than the work (STACK_NOTES); it is
        # opt-in (orchestration.executor), for the scoring fan-out on more cores
        executor=(
            dg.in_process_executor
            if params.orchestration.executor == "in_process"
            else dg.multiprocess_executor.configured(
                {"max_concurrent": params.orchestration.max_concurrent}
            )
        ),
    )


PARAMS = load_params(params_path())
ASSETS = pipeline_assets(PARAMS)
defs = build_definitions(PARAMS)
